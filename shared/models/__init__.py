"""The models: content encoders (text, image, metadata), the item encoder over them, and
the other learned parts of the pipeline.

Modules are imported directly (``shared.models.text`` ...) so that a service that does not
need torch or open_clip never pays for importing them.
"""
