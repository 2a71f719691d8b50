"""`python -m clipsearch`: the same command line as the `clipsearch` script."""

from clipsearch.cli import main

main()
