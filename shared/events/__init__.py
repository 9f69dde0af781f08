"""The wire contract: event models, their serde and the topic registry."""

from shared.events.record import (
    DeadLetter,
    Event,
    ItemEmbedded,
    MoviePublished,
    People,
    RatingSubmitted,
    RecommendationsGenerated,
    RecommendedItem,
    UserProfileUpdated,
    decode_vector,
    encode_vector,
    new_event_id,
)
from shared.events.serde import decode, encode
from shared.events.topic import (
    BY_NAME,
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    MOVIES,
    RATINGS,
    RECOMMENDATIONS,
    TOPICS,
    USER_PROFILES,
    TopicSpec,
)

__all__ = [
    "BY_NAME",
    "DEAD_LETTERS",
    "ITEM_EMBEDDINGS",
    "MOVIES",
    "RATINGS",
    "RECOMMENDATIONS",
    "TOPICS",
    "USER_PROFILES",
    "DeadLetter",
    "Event",
    "ItemEmbedded",
    "MoviePublished",
    "People",
    "RatingSubmitted",
    "RecommendationsGenerated",
    "RecommendedItem",
    "TopicSpec",
    "UserProfileUpdated",
    "decode",
    "decode_vector",
    "encode",
    "encode_vector",
    "new_event_id",
]
