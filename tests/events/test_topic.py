"""The topic registry and the generated documents."""

from __future__ import annotations

import json

import jsonschema
import orjson

from shared.events import BY_NAME, RATINGS, TOPICS, RatingSubmitted, decode
from shared.events.schema import render, topic_schema


def test_every_topic_is_keyed_by_a_field_of_its_record() -> None:
    for spec in TOPICS:
        assert spec.key_field is None or spec.key_field in spec.record.model_fields
    assert len(BY_NAME) == len(TOPICS)


def test_rating_key_is_the_user_id() -> None:
    event = decode(RatingSubmitted, b'{"user_id": 7, "movie_id": 1, "rating": 4, "occurred_at": 0}')
    assert RATINGS.key_of(event) == b"7"


def test_committed_documents_match_the_models() -> None:
    """Regenerate with `python -m shared.events.schema` after changing a model."""
    for path, text in render().items():
        assert path.exists(), f"{path} is missing: run python -m shared.events.schema"
        assert path.read_text() == text, f"{path} is stale: run python -m shared.events.schema"


def test_schema_accepts_what_the_model_accepts_and_refuses_what_it_refuses() -> None:
    schema = topic_schema(RATINGS)
    validator = jsonschema.Draft202012Validator(schema)
    good = {"user_id": 196, "movie_id": "242", "rating": 3.0, "occurred_at": 881250949}
    assert not list(validator.iter_errors(good))
    decode(RatingSubmitted, orjson.dumps(good))
    for bad in ({**good, "rating": 7}, {**good, "extra": 1}, {k: 1 for k in ("user_id",)}):
        assert list(validator.iter_errors(bad)), bad


def test_asyncapi_documents_the_user_facing_topics() -> None:
    doc = json.loads(render()[next(p for p in render() if p.name == "asyncapi.json")])
    assert set(doc["channels"]) == {"movies", "ratings", "recommendations"}
