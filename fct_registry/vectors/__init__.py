"""Embedding sets on disk, faiss search, retrieval metrics and the compatibility table (numpy, pyarrow, faiss;
no torch)."""
