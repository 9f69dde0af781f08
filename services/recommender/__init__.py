"""The recommender service: user profiles in, recommendation lists out."""

SERVICE = "recommender"
"""Consumer group, dead-letter ``service`` field and ready-file name of this service."""
