"""The ingest service: MovieLens replay, one-off publishing and the HTTP gateway."""

SERVICE = "ingest"
"""Service name: ready file, logs."""
