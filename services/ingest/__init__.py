"""The ingest service's entry point (``shared.ingest``)."""
