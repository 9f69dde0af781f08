"""Vector retrieval: ANN indexes, the recommender catalogue, MMR re-ranking."""
