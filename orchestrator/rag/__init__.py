"""Retrieval over the user's own documents: collections in `<sessions_dir>/docs.db`, and the retrieve stage.

chunking.py reads a file (txt, md, html, pdf) into sections and cuts them into overlapping chunks; store.py
keeps collections, files (by content hash), chunks (FTS5) and vectors; embed.py asks an embedding model's
`llama-server --embeddings` for vectors; retrieval.py ranks (BM25, dense, reciprocal rank fusion) and
formats the numbered passages later stages cite as [n].
"""
