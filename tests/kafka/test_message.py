"""Parsing raw messages and building dead letters."""

from __future__ import annotations

import base64

import orjson
import pytest
from pydantic import ValidationError

from shared.config import DEFAULT_DEAD_LETTER_MAX_BYTES, Settings
from shared.events import DEAD_LETTERS, RATINGS, DeadLetter, MoviePublished, decode, encode
from shared.exceptions import InvalidEventError
from shared.kafka.message import (
    DEAD_LETTER_ERROR_BYTES,
    DEAD_LETTER_KEY_BYTES,
    Source,
    dead_letter,
    parse,
    refit,
)

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
    size = DEFAULT_DEAD_LETTER_MAX_BYTES + 5
    huge = dead_letter(source(b"a" * size), "too big", "x").event
    assert isinstance(huge, DeadLetter)
    assert DEFAULT_DEAD_LETTER_MAX_BYTES - 1024 < len(huge.payload) < DEFAULT_DEAD_LETTER_MAX_BYTES
    assert huge.payload == "a" * len(huge.payload)
    assert huge.error == f"too big (payload of {size} bytes cut)"


# --- dead letters stay small whatever the input (the "bad and hostile input" issue) ---


def letter_of(out_event: object) -> DeadLetter:
    assert isinstance(out_event, DeadLetter)
    return out_event


def hostile_movie() -> bytes:
    """A 649 KB movie with 60,000 unknown fields: pydantic's error text was 3 MB."""
    fields = {f"f{i:05d}": 0 for i in range(60_000)}
    raw = orjson.dumps({"movie_id": "1", "title": "Flood", **fields})
    assert 600_000 < len(raw) < 700_000
    return raw


def pydantic_error_text(raw: bytes) -> str:
    try:
        MoviePublished.model_validate(orjson.loads(raw))
    except ValidationError as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError("the movie should be invalid")


@pytest.mark.parametrize("cap", [DEFAULT_DEAD_LETTER_MAX_BYTES, 16_384, 900_000])
def test_a_dead_letter_of_a_hostile_movie_stays_under_the_cap(cap: int) -> None:
    raw = hostile_movie()
    error = pydantic_error_text(raw)
    assert len(error) > 3_000_000
    hostile = Source("movies", 0, 7, b"k" * 500_000, raw, None)

    out = dead_letter(hostile, error, "item-embedding", max_bytes=cap)

    letter = letter_of(out.event)
    assert len(encode(letter)) <= cap
    assert len(letter.error.encode()) <= min(DEAD_LETTER_ERROR_BYTES, cap // 4)
    assert len(letter.key or "") <= min(DEAD_LETTER_KEY_BYTES, cap // 16)
    assert letter.error.startswith("ValidationError: 60000 validation errors for MoviePublished")
    assert f"error of {len(error)} bytes cut" in letter.error
    assert "key of 500000 bytes cut" in letter.error
    assert letter.payload_encoding == "utf-8"
    if cap > len(raw) + 10_000:
        assert letter.payload == raw.decode() and "payload" not in letter.error
    else:
        assert f"payload of {len(raw)} bytes cut" in letter.error
        assert raw.decode().startswith(letter.payload)
        assert len(letter.payload) > cap // 2  # the payload gets what the rest leaves


def test_the_decoders_own_error_for_the_hostile_movie_is_short() -> None:
    raw = hostile_movie()
    with pytest.raises(InvalidEventError) as caught:
        decode(MoviePublished, raw)
    assert len(str(caught.value)) < 2_000
    out = dead_letter(Source("movies", 0, 7, b"1", raw, None), str(caught.value), "x")
    assert len(encode(out.event)) <= DEFAULT_DEAD_LETTER_MAX_BYTES


@pytest.mark.parametrize(
    "value",
    [
        b"\x00" * 300_000,  # every byte escaped as \u0000 in JSON: six times longer
        ('"\\' * 200_000).encode(),  # quotes and backslashes escaped
        ("\u00e9\u4e2d\U0001f600" * 50_000).encode(),  # multi-byte characters
        bytes(range(256)) * 4_000,  # binary: base64
        b"",
        None,
    ],
)
@pytest.mark.parametrize("key", [None, b"", b"\xff" * 500_000, "\u00e9".encode() * 300_000])
def test_a_dead_letter_is_never_above_the_cap(value: bytes | None, key: bytes | None) -> None:
    error = "\ud800 lone surrogate and \x00 controls " * 100_000
    for cap in (16_384, DEFAULT_DEAD_LETTER_MAX_BYTES):
        out = dead_letter(Source("t" * 249, None, None, key, value, None), error, "svc", cap)
        letter = letter_of(out.event)
        assert len(encode(letter)) <= cap
        if letter.payload_encoding == "base64":
            assert (value or b"").startswith(base64.b64decode(letter.payload))


def test_a_small_letter_is_kept_whole() -> None:
    letter = letter_of(dead_letter(source(VALID), "bad", "x").event)
    assert (letter.payload, letter.key, letter.error) == (VALID.decode(), "196", "bad")


def test_the_cap_is_a_setting_with_a_64_kib_default() -> None:
    assert Settings().dead_letter_max_bytes == DEFAULT_DEAD_LETTER_MAX_BYTES == 64 * 1024
    assert Settings(REELSTREAM_DEAD_LETTER_MAX_BYTES=20_000).dead_letter_max_bytes == 20_000
    with pytest.raises(ValidationError):
        Settings(REELSTREAM_DEAD_LETTER_MAX_BYTES=2_000_000)


@pytest.mark.parametrize("value", [b"x" * 200_000, b"\xff\x00" * 100_000])
def test_refit_cuts_a_letter_made_under_a_larger_cap(value: bytes) -> None:
    """The publisher applies ``dead_letter_max_bytes`` to letters the pure handlers made
    with the default cap."""
    made = letter_of(dead_letter(source(value), "bad " * 3_000, "svc").event)
    assert len(encode(made)) > 16_384

    cut = refit(made, 16_384)

    assert len(encode(cut)) <= 16_384
    assert (cut.source_topic, cut.partition, cut.offset, cut.key) == ("ratings", 0, 41, "196")
    assert cut.payload_encoding == made.payload_encoding and cut.error.startswith("bad bad")
    assert refit(cut, 16_384) is cut
