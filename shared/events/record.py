"""The wire contract: one pydantic model per topic.

Values are JSON objects (orjson). Unknown fields are rejected and types are strict: a
number is never read from text or a boolean (``"year": "2000"``, ``"rating": true``) nor
text from a number, except for the documented forms: ids may arrive as JSON numbers or
strings and are always strings inside, timestamps arrive as ISO-8601 text or epoch
seconds (a JSON number) and leave as ISO-8601 UTC. Vectors travel as base64 of
little-endian float32 (a quarter of the size of a JSON float list).
"""

from __future__ import annotations

import base64
import binascii
import numbers
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Vector: TypeAlias = npt.NDArray[np.float32]
"""A 1-D float32 array."""

MAX_VECTOR_DIM = 4096


MAX_ID_LENGTH = 64


def _id(value: Any) -> str:
    # One function rather than a coercion and two length constraints: every event
    # carries ids (an item-features event 50 of them), and each validator is a Python
    # call. The errors are pydantic's own for a string.
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, int) and not isinstance(value, bool):
        # JSON producers often send numeric ids; bool is an int subclass but never an id.
        text = str(value)
    else:
        raise PydanticCustomError("string_type", "Input should be a valid string")
    if not text:
        raise PydanticCustomError("string_too_short", "String should have at least 1 character")
    if len(text) > MAX_ID_LENGTH:
        raise PydanticCustomError(
            "string_too_long",
            "String should have at most {max_length} characters",
            {"max_length": MAX_ID_LENGTH},
        )
    return text


Id = Annotated[
    str,
    PlainValidator(_id),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": 64},
                {"type": "integer", "description": "sent as a number; read as its string"},
            ]
        },
        mode="validation",
    ),
]
"""An entity id: a non-empty string of at most 64 characters (JSON integers accepted)."""


def _timestamp_input(value: Any) -> Any:
    # The timestamp is the one lax field of the strict models (ISO text or epoch seconds
    # both parse), so the forms the contract does not document are refused here.
    if isinstance(value, bool):
        raise ValueError("a timestamp is ISO-8601 text or epoch seconds, not a boolean")
    if isinstance(value, bytes) or (
        isinstance(value, str) and value.strip().lstrip("+-").replace(".", "", 1).isdigit()
    ):
        raise ValueError("epoch seconds must be a JSON number, not text")
    return value


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = Annotated[
    datetime,
    Strict(False),
    BeforeValidator(_timestamp_input),
    AfterValidator(_utc),
    PlainSerializer(
        lambda d: d.isoformat().replace("+00:00", "Z"), return_type=str, when_used="json"
    ),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "number", "description": "seconds since the Unix epoch"},
            ]
        },
        mode="validation",
    ),
]
"""A UTC instant; accepts ISO-8601 text (naive means UTC) or epoch seconds as a number."""


def encode_vector(vector: Vector) -> str:
    """Base64 of the little-endian float32 bytes of a 1-D vector."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _all_numbers(values: list[Any] | tuple[Any, ...] | np.ndarray) -> bool:
    # numpy would read "1.5" or True as a number.
    if isinstance(values, np.ndarray):
        return values.dtype.kind in "iuf"
    return all(isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_) for x in values)


def decode_vector(value: Any) -> Vector:
    """Read a vector from base64 text, a list of numbers or an array; must be finite."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"vector is not valid base64: {exc}") from exc
        if len(raw) % 4:
            raise ValueError("vector byte length is not a multiple of 4 (float32)")
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif isinstance(value, list | tuple | np.ndarray):
        if not _all_numbers(value):
            raise ValueError("vector entries must be numbers, not text or booleans")
        try:
            array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"vector is not numeric: {exc}") from exc
    else:
        raise ValueError("vector must be base64 float32 text")
    if array.ndim != 1 or not 0 < array.size <= MAX_VECTOR_DIM:
        raise ValueError(f"vector must be 1-D with 1..{MAX_VECTOR_DIM} entries")
    if not np.isfinite(array).all():
        raise ValueError("vector contains NaN or infinity")
    return array


VectorField = Annotated[
    np.ndarray,
    PlainValidator(decode_vector),
    PlainSerializer(encode_vector, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "description": "little-endian float32 array, base64-encoded",
        }
    ),
]


def new_event_id() -> str:
    """A random event id (32 hex characters)."""
    return uuid.uuid4().hex


class Event(BaseModel):
    """Base of every topic's value: unknown fields refused, strict types (no coercion)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        arbitrary_types_allowed=True,
        use_attribute_docstrings=True,
    )


class People(BaseModel):
    """Names or ids of a movie's people; order matters (first director, lead actor)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True
    )

    directors: list[Annotated[str, StringConstraints(max_length=200)]] = Field(
        default_factory=list, max_length=50
    )
    cast: list[Annotated[str, StringConstraints(max_length=200)]] = Field(
        default_factory=list, max_length=200
    )
    writers: list[Annotated[str, StringConstraints(max_length=200)]] = Field(
        default_factory=list, max_length=50
    )


MetadataValue = str | int | float | bool | list[str] | None


class MoviePublished(Event):
    """A movie entering the catalogue (topic ``movies``, key ``movie_id``, compacted)."""

    movie_id: Id
    title: Annotated[str, StringConstraints(min_length=1, max_length=500, strip_whitespace=True)]
    year: int | None = Field(None, ge=1870, le=2100)
    genres: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    overview: str = Field("", max_length=20_000)
    people: People = Field(default_factory=People)
    poster: str | None = None
    """A file in the item-embedding service's ``REELSTREAM_POSTER_DIR`` (a path, absolute
    or relative to it), an http(s) URL on a public address, or a ``data:image/...;base64,``
    URI. A poster that is refused or unreadable only leaves the image modality out."""
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, max_length=100)


NEWCOMERS_USER_ID = "_newcomers"
"""The ``user_id`` of the list for users with no rating yet on ``recommendations``: what
a user who just arrived is shown until their first rating gets them a list of their own.
No rating may carry it."""


class RatingSubmitted(Event):
    """A user's rating of a movie (topic ``ratings``, key ``user_id``)."""

    event_id: Id = Field(default_factory=new_event_id)
    user_id: Id
    """Any id but ``_newcomers``, which names the newcomers' list on ``recommendations``."""
    movie_id: Id
    rating: float = Field(ge=0.5, le=5.0, allow_inf_nan=False)
    """Stars, 0.5 to 5.0."""
    occurred_at: Timestamp

    @field_validator("user_id")
    @classmethod
    def _not_reserved(cls, user_id: str) -> str:
        if user_id == NEWCOMERS_USER_ID:
            raise ValueError(f"user_id {NEWCOMERS_USER_ID!r} is reserved for the newcomers' list")
        return user_id


Modality = Literal["text", "image", "metadata"]


class ItemEmbedded(Event):
    """A movie's vector (topic ``item-embeddings``, key ``movie_id``, compacted).

    Only the item-embedding service publishes it: from the movie's content, and again
    whenever a rating moves the vector of a movie the item encoder did not learn from
    ratings (``rated_in_training`` false; ``online_ratings`` counts those ratings, which
    reach it as ``ItemRated`` events on ``item-feedback``).
    """

    movie_id: Id
    title: str
    year: int | None = None
    genres: list[str] = Field(default_factory=list)
    vector: VectorField
    """L2-normalised item vector."""
    modalities: list[Modality]
    """Which inputs contributed; a missing modality is masked, never zero-filled silently."""
    model_version: str
    published_at: Timestamp | None = None
    """Broker timestamp of the ``movies`` message that caused this embedding."""
    embedded_at: Timestamp
    """When this vector was computed (by the encoder, or by the last online move)."""
    rated_in_training: bool = True
    """True when the item encoder learned this movie's vector from its training ratings;
    false when the vector stands for the content alone (a movie nobody had rated). An
    event without the field (from a producer that predates it) counts as true: a vector
    of unknown origin is never moved."""
    online_ratings: int = Field(0, ge=0)
    """Ratings that have moved the vector since the encoder made it (0: as encoded)."""
    content_vector: VectorField | None = None
    """The vector as the encoder made it, when ``vector`` has been moved (None: it has
    not). A user's profile learns a rating from this one: it does not depend on how far
    the other raters' moves had come when the rating was applied."""


class ItemRated(Event):
    """A rating as the movie's side needs it (topic ``item-feedback``, key ``movie_id``).

    The user-profile service publishes one per rating it applies: the ``ratings``
    stream repartitioned by movie, so that per-movie state lives with the movie's
    owner. ``taste`` travels only for a movie whose vector stands for its content
    alone (``ItemEmbedded.rated_in_training`` false), which its raters then move.
    """

    movie_id: Id
    user_id: Id
    rating: float = Field(ge=0.5, le=5.0, allow_inf_nan=False)
    occurred_at: Timestamp
    rating_event_id: Id
    """``event_id`` of the rating: a copy of the same rating is applied once."""
    taste: VectorField | None = None
    """The rater's profile before this rating, less what every profile shares (the
    user model's prior); None for a user's first rating, or a movie that is not moved."""
    model_version: str
    """The user model that made ``taste``."""
    cause_published_at: Timestamp
    """Broker timestamp of the rating."""
    co_rated: list[Id] = []
    """The rater's latest earlier-rated movies (up to 10), oldest first: the movies this
    rating counts as co-rated with this one."""


class ItemFeaturesUpdated(Event):
    """A movie's online rating statistics (topic ``item-features``, key ``movie_id``,
    compacted), published by the item side after each batch that rated the movie.

    The decayed counts are ``log2`` of ``Σ 2^(t_i / half-life)`` over the movie's
    ratings' times ``t_i`` in days since the Unix epoch: read at time ``T`` the decayed
    count is ``2^(log_decayed - T / half_life_days)``.
    """

    movie_id: Id
    n_ratings: int = Field(ge=0)
    rating_sum: float = Field(ge=0.0, allow_inf_nan=False)
    """Sum of the movie's ratings in stars."""
    log_decayed: float = Field(allow_inf_nan=False)
    log_fast_decayed: float = Field(allow_inf_nan=False)
    half_life_days: float = Field(gt=0.0, allow_inf_nan=False)
    fast_half_life_days: float = Field(gt=0.0, allow_inf_nan=False)
    last_rated_at: Timestamp
    """``occurred_at`` of the movie's newest rating."""
    co_rated: list[Id] = []
    """The movies most often among its raters' latest earlier-rated movies, most first
    (up to 50)."""
    co_counts: list[Annotated[int, Field(ge=1)]] = []
    """How often each of ``co_rated`` was, same order."""
    last_rating_event_id: Id
    """``event_id`` of the latest rating these statistics took in (the cause of lists
    they change, such as the newcomers' list)."""
    updated_at: Timestamp
    """When the item side published these statistics."""

    @model_validator(mode="after")
    def _co_counts_match(self) -> ItemFeaturesUpdated:
        if len(self.co_counts) != len(self.co_rated):
            raise ValueError(
                f"{len(self.co_rated)} co-rated movies but {len(self.co_counts)} counts"
            )
        return self


class UserProfileUpdated(Event):
    """A user's current taste (topic ``user-profiles``, key ``user_id``, compacted)."""

    user_id: Id
    vector: VectorField
    """L2-normalised user vector in the item space."""
    n_ratings: int = Field(ge=0)
    mean_rating: float
    """Shrunk mean of the user's ratings (stars); a simple rating predictor."""
    rated: list[Id]
    """The movies the user has rated most lately, oldest first, each once: the last
    ``len(rated)`` of the ``n_rated`` movies the user has rated (a re-rated movie keeps
    its place). The recommender keeps the earlier ones from the profiles before, and
    never recommends any of them back."""
    ratings: list[Annotated[float, Field(ge=0.5, le=5.0, allow_inf_nan=False)]] = []
    """The user's latest stars for each movie of ``rated``, same order (the rating
    predictor's input); empty from producers that do not send them."""
    n_rated: int | None = Field(None, ge=0)
    """How many distinct movies the user has rated (None: ``rated`` is all of them)."""
    model_version: str
    cause_event_id: Id
    cause_published_at: Timestamp
    """Broker timestamp of the rating that caused this update (start of ``latency_ms``)."""
    updated_at: Timestamp

    @model_validator(mode="after")
    def _ratings_match_rated(self) -> UserProfileUpdated:
        if self.ratings and len(self.ratings) != len(self.rated):
            raise ValueError(
                f"ratings has {len(self.ratings)} entries but rated has {len(self.rated)}"
            )
        if self.n_rated is not None and self.n_rated < len(self.rated):
            raise ValueError(f"n_rated is {self.n_rated} but rated has {len(self.rated)}")
        return self


class RecommendedItem(BaseModel):
    """One entry of a recommendation list, best first."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True
    )

    movie_id: Id
    title: str
    score: float
    """Re-ranked relevance (cosine similarity for the baseline)."""
    predicted_rating: float | None = None
    """Predicted stars, 0.5 to 5.0, when a rating predictor is configured."""


class RecommendationsGenerated(Event):
    """A user's fresh list (topic ``recommendations``, key ``user_id``)."""

    user_id: Id
    """The user the list is for; ``_newcomers``: the list for every user with no rating
    yet (the movies rated most of late), published again whenever its movies change."""
    items: list[RecommendedItem]
    model_version: str
    cause_event_id: Id
    generated_at: Timestamp
    latency_ms: float
    """From the cause rating's broker timestamp to this list's publication (ms)."""


class DeadLetter(Event):
    """A message a service could not process, with the reason (topic ``dead-letters``)."""

    source_topic: str
    partition: int | None
    offset: int | None
    key: str | None
    payload: str
    """The raw value: UTF-8 text when it decodes, else base64 (see ``payload_encoding``)."""
    payload_encoding: Literal["utf-8", "base64"]
    error: str
    service: str
    failed_at: Timestamp
