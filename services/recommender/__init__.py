"""The recommender service: user profiles in, recommendation lists out."""
