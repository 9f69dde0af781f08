"""The wire contract's models: what they accept, what they refuse, how they look."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import orjson
import pytest

from shared.events import (
    ItemEmbedded,
    MoviePublished,
    RatingSubmitted,
    UserProfileUpdated,
    decode,
    decode_vector,
    encode,
    encode_vector,
)
from shared.events.serde import MAX_ERRORS_DESCRIBED
from shared.exceptions import InvalidEventError

RATING = {"user_id": "196", "movie_id": "242", "rating": 3.0, "occurred_at": "1997-12-04T15:55:49Z"}


def test_rating_from_the_readme_example() -> None:
    event = decode(RatingSubmitted, orjson.dumps(RATING))
    assert event.user_id == "196"
    assert event.occurred_at == datetime(1997, 12, 4, 15, 55, 49, tzinfo=UTC)
    assert len(event.event_id) == 32  # assigned when absent


def test_numeric_ids_and_epoch_seconds_are_accepted() -> None:
    raw = {"user_id": 196, "movie_id": 242, "rating": 3, "occurred_at": 881250949}
    event = decode(RatingSubmitted, orjson.dumps(raw))
    assert (event.user_id, event.movie_id) == ("196", "242")
    assert event.occurred_at == datetime(1997, 12, 4, 15, 55, 49, tzinfo=UTC)


def test_naive_timestamps_are_utc_and_serialise_with_z() -> None:
    event = decode(RatingSubmitted, orjson.dumps({**RATING, "occurred_at": "1997-12-04T15:55:49"}))
    assert orjson.loads(encode(event))["occurred_at"] == "1997-12-04T15:55:49Z"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rating": 7}, "rating"),
        ({"rating": 0.0}, "rating"),
        ({"rating": "three"}, "rating"),
        ({"user_id": True}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": None}, "user_id"),
        ({"user_id": "_newcomers"}, "user_id '_newcomers' is reserved"),
        ({"movie_id": [1]}, "movie_id"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"stars": 3}, "stars"),
    ],
)
def test_invalid_ratings_name_the_field(change: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason):
        decode(RatingSubmitted, orjson.dumps({**RATING, **change}))


def test_missing_field_is_reported() -> None:
    with pytest.raises(InvalidEventError, match="movie_id: Field required"):
        decode(RatingSubmitted, orjson.dumps({k: v for k, v in RATING.items() if k != "movie_id"}))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(b"", "empty"), (b"{not json", "invalid JSON"), (b"[1, 2]", "JSON object"), (None, "empty")],
)
def test_undecodable_values(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason):
        decode(RatingSubmitted, raw)


def test_minimal_movie_gets_defaults() -> None:
    movie = decode(MoviePublished, b'{"movie_id": 1683, "title": "  New Film "}')
    assert movie.movie_id == "1683"
    assert movie.title == "New Film"
    assert movie.genres == [] and movie.people.cast == [] and movie.poster is None


def test_vector_travels_as_base64_float32() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    text = encode_vector(vector)
    assert len(text) == 4 * 384 * 4 // 3  # base64 of 1,536 bytes
    np.testing.assert_array_equal(decode_vector(text), vector)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("not base64!", "base64"),
        (encode_vector(np.array([np.nan], dtype=np.float32)), "NaN"),
        ("AAA=", "multiple of 4"),
        ([], "1-D"),
    ],
)
def test_bad_vectors_are_refused(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_vector(value)


def test_item_embedding_round_trip() -> None:
    item = ItemEmbedded(
        movie_id="1",
        title="Toy Story",
        year=1995,
        genres=["Animation"],
        vector=np.ones(8, dtype=np.float32) / np.sqrt(8),
        modalities=["text", "metadata"],
        model_version="test",
        embedded_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    back = decode(ItemEmbedded, encode(item))
    np.testing.assert_array_equal(back.vector, item.vector)
    assert back.model_dump(exclude={"vector"}) == item.model_dump(exclude={"vector"})


def test_an_item_embedding_from_before_the_pull_fields_is_never_moved() -> None:
    item = ItemEmbedded(
        movie_id="1",
        title="Toy Story",
        vector=np.ones(8, dtype=np.float32) / np.sqrt(8),
        modalities=["text"],
        model_version="test",
        embedded_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    old = orjson.loads(encode(item))
    del old["rated_in_training"], old["online_ratings"]

    back = decode(ItemEmbedded, orjson.dumps(old))

    assert back.rated_in_training and back.online_ratings == 0


def profile(**change: object) -> bytes:
    base = {
        "user_id": "7",
        "vector": encode_vector(np.array([0.6, 0.8], dtype=np.float32)),
        "n_ratings": 2,
        "mean_rating": 3.6,
        "rated": ["1", "2"],
        "model_version": "test",
        "cause_event_id": "e1",
        "cause_published_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    return orjson.dumps({**base, **change})


def test_a_profile_carries_its_ratings_or_none() -> None:
    assert decode(UserProfileUpdated, profile(ratings=[4.0, 2.5])).ratings == [4.0, 2.5]
    assert decode(UserProfileUpdated, profile()).ratings == []  # an older producer


@pytest.mark.parametrize(
    ("ratings", "reason"),
    [([4.0], "ratings has 1 entries but rated has 2"), ([4.0, 9.0], "less than or equal")],
)
def test_profile_ratings_must_match_rated_and_be_stars(ratings: list[float], reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason):
        decode(UserProfileUpdated, profile(ratings=ratings))


# --- strict types: no coercion on the wire (the "bad and hostile input" issue) ----------

MOVIE = {"movie_id": "1683", "title": "The Matrix", "year": 1999}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rating": "4"}, "rating"),  # a string rating was read as 4.0
        ({"rating": "4.5"}, "rating"),
        ({"rating": True}, "rating"),  # a boolean rating was read as 1.0 (then refused as < 0.5)
        ({"rating": False}, "rating"),
        ({"user_id": True}, "user_id"),
        ({"movie_id": False}, "movie_id"),
        ({"event_id": True}, "event_id"),
        ({"movie_id": 242.0}, "movie_id"),  # ids are integers or text, not floats
        ({"occurred_at": True}, "occurred_at"),
        ({"occurred_at": "881250949"}, "occurred_at"),  # epoch seconds are a number
    ],
)
def test_strict_types_refuse_coercible_rating_fields(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidEventError, match=f"{field}: "):
        decode(RatingSubmitted, orjson.dumps({**RATING, **change}))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"year": "2000"}, "year"),  # a string year was read as 2000
        ({"year": True}, "year"),
        ({"year": 1999.0}, "year"),
        ({"title": 1999}, "title"),  # a number where text is expected
        ({"overview": 42}, "overview"),
        ({"genres": [1]}, "genres.0"),
        ({"poster": 7}, "poster"),
        ({"people": {"cast": [3]}}, "people.cast.0"),
    ],
)
def test_strict_types_refuse_coercible_movie_fields(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidEventError, match=f"{field}: "):
        decode(MoviePublished, orjson.dumps({**MOVIE, **change}))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_ratings": "2"}, "n_ratings"),
        ({"n_ratings": True}, "n_ratings"),
        ({"mean_rating": "3.6"}, "mean_rating"),
        ({"ratings": ["4", "2.5"]}, "ratings.0"),
        ({"rated": [True, "2"]}, "rated.0"),
        ({"updated_at": False}, "updated_at"),
        ({"vector": ["0.6", "0.8"]}, "vector"),
        ({"vector": [True, False]}, "vector"),
    ],
)
def test_strict_types_refuse_coercible_profile_fields(
    change: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidEventError, match=f"{field}: "):
        decode(UserProfileUpdated, profile(**change))


def test_documented_lax_forms_still_parse_under_strict_types() -> None:
    # Ids as JSON numbers, epoch seconds as an integer or a float, ISO text with an offset.
    event = decode(
        RatingSubmitted,
        orjson.dumps({**RATING, "user_id": 196, "rating": 4, "occurred_at": 881250949.5}),
    )
    assert (event.user_id, event.rating) == ("196", 4.0)
    assert event.occurred_at == datetime(1997, 12, 4, 15, 55, 49, 500000, tzinfo=UTC)
    iso = decode(
        RatingSubmitted, orjson.dumps({**RATING, "occurred_at": "1997-12-04T16:55:49+01:00"})
    )
    assert iso.occurred_at == datetime(1997, 12, 4, 15, 55, 49, tzinfo=UTC)
    movie = decode(
        MoviePublished, orjson.dumps({**MOVIE, "metadata": {"a": 1, "b": True, "c": "x"}})
    )
    assert movie.metadata == {"a": 1, "b": True, "c": "x"}
    assert decode(UserProfileUpdated, profile(vector=[0.6, 0.8])).vector.tolist() == pytest.approx(
        [0.6, 0.8]
    )


def test_validation_errors_name_the_first_few_fields_and_count_the_rest() -> None:
    # A 649 KB movie with 60,000 unknown fields made an error text of 3 MB.
    movie = {**MOVIE, **{f"f{i:05d}": 0 for i in range(60_000)}}
    raw = orjson.dumps(movie)
    assert len(raw) > 600_000
    with pytest.raises(InvalidEventError) as caught:
        decode(MoviePublished, raw)
    message = str(caught.value)
    assert message.startswith("invalid MoviePublished: f00000: Extra inputs")
    assert message.endswith(f"and {60_000 - MAX_ERRORS_DESCRIBED} more errors")
    assert len(message) < 2_000


def test_a_huge_field_name_or_value_is_cut_short_in_the_error() -> None:
    with pytest.raises(InvalidEventError) as caught:
        decode(RatingSubmitted, orjson.dumps({**RATING, "k" * 100_000: "v" * 100_000}))
    assert len(str(caught.value)) < 1_000
