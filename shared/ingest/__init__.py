"""Ingest: the MovieLens replay, one-off publishing and the HTTP gateway, run by
``python -m services.ingest``."""

SERVICE = "ingest"
"""Service name: ready file, logs."""
