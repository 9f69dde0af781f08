"""Datasets read as contract events (MovieLens-100K)."""

from shared.data.movielens import ML100K_GENRES, DatasetError, MovieLens, load_movielens

__all__ = ["ML100K_GENRES", "DatasetError", "MovieLens", "load_movielens"]
