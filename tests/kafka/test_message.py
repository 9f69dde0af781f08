"""Parsing raw messages and building dead letters."""

from __future__ import annotations

import base64

import pytest

from shared.events import DEAD_LETTERS, RATINGS, DeadLetter
from shared.exceptions import InvalidEventError
from shared.kafka.message import MAX_DEAD_LETTER_PAYLOAD, Source, dead_letter, parse

VALID = b'{"user_id": "196", "movie_id": "242", "rating": 3, "occurred_at": 881250949}'


def source(value: bytes | None, key: bytes | None = b"196") -> Source:
    return Source("ratings", 0, 41, key, value, 1_700_000_000_000)


def test_parse_keeps_where_the_event_came_from() -> None:
    incoming = parse(RATINGS, source(VALID), max_bytes=10_000)
    assert incoming.event.user_id == "196"
    assert (incoming.source.partition, incoming.source.offset) == (0, 41)


@pytest.mark.parametrize(
    ("key", "reason"), [(b"5", "must be the user_id '196'"), (None, "must be the user_id")]
)
def test_a_key_that_is_not_the_user_id_is_refused(key: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEventError, match=reason):
        parse(RATINGS, source(VALID, key), max_bytes=10_000)


def test_oversized_messages_are_refused_unread() -> None:
    with pytest.raises(InvalidEventError, match="exceeds the limit of 50"):
        parse(RATINGS, source(VALID), max_bytes=50)


def test_dead_letter_keeps_text_payloads_as_text() -> None:
    out = dead_letter(source(b"{oops"), "invalid JSON", "user-profile")
    letter = out.event
    assert out.spec is DEAD_LETTERS and isinstance(letter, DeadLetter)
    assert (letter.payload, letter.payload_encoding) == ("{oops", "utf-8")
    assert (letter.source_topic, letter.partition, letter.offset, letter.key) == (
        "ratings",
        0,
        41,
        "196",
    )
    assert letter.service == "user-profile" and letter.error == "invalid JSON"


def test_dead_letter_base64s_binary_and_truncates_huge_payloads() -> None:
    binary = dead_letter(source(b"\xff\xfe\x00"), "bad", "x").event
    assert isinstance(binary, DeadLetter)
    assert binary.payload_encoding == "base64"
    assert base64.b64decode(binary.payload) == b"\xff\xfe\x00"
    huge = dead_letter(source(b"a" * (MAX_DEAD_LETTER_PAYLOAD + 5)), "too big", "x").event
    assert isinstance(huge, DeadLetter)
    assert len(huge.payload) == MAX_DEAD_LETTER_PAYLOAD
    assert "truncated" in huge.error
