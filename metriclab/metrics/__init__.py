"""Scores of embeddings: retrieval, verification and clustering metrics (``retrieval``), exact ranking (``ranking``)."""
