"""The read side: each user's current list, each movie and its neighbours, over HTTP.

``ReadViews`` (``views``) holds materialized views of compacted topics, read whole
(global tables): the latest list per user (``recommendations``), the latest profile per
user (``user-profiles``) and the catalogue as served (``item-embeddings``, also in a
Qdrant collection for "more like this"). ``create_app`` (``app``) serves them with
FastAPI. The read side publishes nothing.
"""

SERVICE = "api"
