"""`python -m clipsearch`: the same command line as the `clipsearch` script."""

from clipsearch.launch import main

main()
