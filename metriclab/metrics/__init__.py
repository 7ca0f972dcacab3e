"""Scores of embeddings: retrieval, verification and clustering metrics (``retrieval``), exact ranking
(``ranking``, compiled by numba) and its native loading (``kernels``)."""
