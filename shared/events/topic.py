"""The one registry of topics: name, key field, value model and cleanup policy.

No service writes a topic name as a literal; they import these specs and resolve the
physical name with ``Settings.topic(spec.name)`` (which adds an optional prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.events.record import (
    DeadLetter,
    Event,
    ItemEmbedded,
    ItemFeaturesUpdated,
    ItemRated,
    MoviePublished,
    RatingSubmitted,
    RecommendationsGenerated,
    UserProfileUpdated,
)


@dataclass(frozen=True)
class TopicSpec:
    """A topic of the wire contract."""

    name: str
    record: type[Event]
    key_field: str | None
    """Field of the value whose string form is the message key (None: unkeyed)."""
    compacted: bool
    """True for topics that hold the latest value per key (cleanup.policy=compact)."""
    user_facing: bool = False
    """Published or consumed by users (documented in the AsyncAPI file)."""

    def key_of(self, event: Event) -> bytes | None:
        """The message key of an event of this topic (UTF-8 entity id)."""
        value = None if self.key_field is None else getattr(event, self.key_field)
        return None if value is None else str(value).encode()


MOVIES = TopicSpec("movies", MoviePublished, "movie_id", compacted=True, user_facing=True)
RATINGS = TopicSpec("ratings", RatingSubmitted, "user_id", compacted=False, user_facing=True)
ITEM_EMBEDDINGS = TopicSpec("item-embeddings", ItemEmbedded, "movie_id", compacted=True)
ITEM_FEEDBACK = TopicSpec("item-feedback", ItemRated, "movie_id", compacted=False)
ITEM_FEATURES = TopicSpec("item-features", ItemFeaturesUpdated, "movie_id", compacted=True)
USER_PROFILES = TopicSpec("user-profiles", UserProfileUpdated, "user_id", compacted=True)
RECOMMENDATIONS = TopicSpec(
    "recommendations", RecommendationsGenerated, "user_id", compacted=True, user_facing=True
)
DEAD_LETTERS = TopicSpec("dead-letters", DeadLetter, "key", compacted=False)

TOPICS: tuple[TopicSpec, ...] = (
    MOVIES,
    RATINGS,
    ITEM_EMBEDDINGS,
    ITEM_FEEDBACK,
    ITEM_FEATURES,
    USER_PROFILES,
    RECOMMENDATIONS,
    DEAD_LETTERS,
)
BY_NAME: dict[str, TopicSpec] = {spec.name: spec for spec in TOPICS}
