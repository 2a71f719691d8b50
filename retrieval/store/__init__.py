"""Storage: the SQLite catalog (the truth), the FAISS vector index derived from it, and the code that keeps the two
in step. Never imports ``indexer``."""
