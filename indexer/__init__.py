"""The write side of clipsearch: scan folders, decode images, encode them, update the catalog and the index."""
