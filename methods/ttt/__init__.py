"""Test-time training on nearest neighbours (Hardt & Sun 2024; SPEC 3), score first: `method.py`
registers `ttt-nn` and its control `ttt-random`; `datastore.py` holds the prepare-split chunks, keyed by
the base model's own hidden states, and their faiss search."""
