"""The models: content encoders (text, image, metadata), the item encoder over them, the
other learned parts of the pipeline, and the recommendation list they rank
(``recommend``: retrieval from ``shared.retrieval``, the ranker, MMR).

Modules are imported directly (``shared.models.text`` ...) so that a service that does not
need torch or open_clip never pays for importing them.
"""
