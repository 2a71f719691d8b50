"""The application layer: the `clipsearch` command line and the lab (evaluation, training).

It sits above the two libraries, `retrieval` (core, model, store, search) and `indexer` (the write side), and may
import both; neither library imports it. That keeps the package graph a tree: clipsearch -> indexer -> retrieval.
"""
