"""The read side: the search engine, its HTTP server and client, thumbnails and index facts. Never imports
``indexer``."""
