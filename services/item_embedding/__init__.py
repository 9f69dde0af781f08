"""The item-embedding service: ``movies`` in, Qdrant points and ``item-embeddings`` out."""
