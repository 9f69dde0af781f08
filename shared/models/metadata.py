"""Metadata features: a genre multi-hot and hashed people features.

Both are deterministic across processes and machines: genres match a fixed list, and
people are hashed with blake2b (never Python's ``hash``, which is salted per process).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from shared.data.movielens import ML100K_GENRES
from shared.domain import People
from shared.types import Vector

GENRE_FEATURES: tuple[str, ...] = (*ML100K_GENRES, "other")
"""Columns of the genre multi-hot: the ML-100K genres, then a bucket for any other genre."""

PEOPLE_DIM = 64
"""Width of the hashed people features (default)."""

DIRECTOR_WEIGHT = 1.0
WRITER_WEIGHT = 0.5
LEAD_CAST = 3
"""Billing positions counted as lead actors, at full weight."""
SUPPORTING_CAST_DECAY = 0.7
"""Each supporting actor after the leads weighs this much of the previous one."""
MAX_CAST = 15
"""Cast members hashed (later billing adds noise, not signal)."""


def _genre_key(genre: str) -> str:
    # "Sci-Fi", "sci fi" and "SCIFI" are one genre; so are "Children's" and "childrens".
    return re.sub(r"[^0-9a-z]", "", genre.lower())


_GENRE_INDEX: dict[str, int] = {_genre_key(g): i for i, g in enumerate(ML100K_GENRES)}
_GENRE_INDEX.update(
    {
        # Names other catalogues (TMDB, IMDb) use for the same genres.
        "sciencefiction": ML100K_GENRES.index("Sci-Fi"),
        "children": ML100K_GENRES.index("Children's"),
        "kids": ML100K_GENRES.index("Children's"),
        "family": ML100K_GENRES.index("Children's"),
        "noir": ML100K_GENRES.index("Film-Noir"),
        "music": ML100K_GENRES.index("Musical"),
    }
)
_OTHER = len(ML100K_GENRES)


def genre_index(genre: str) -> int:
    """Column of a genre in ``GENRE_FEATURES``: case-insensitive, ``other`` when unknown."""
    return _GENRE_INDEX.get(_genre_key(genre), _OTHER)


def genre_features(genres: Sequence[str]) -> Vector | None:
    """Multi-hot over ``GENRE_FEATURES`` (float32, 0/1); None when no genre is given."""
    names = [g for g in genres if g.strip()]
    if not names:
        return None
    vector = np.zeros(len(GENRE_FEATURES), dtype=np.float32)
    for genre in names:
        vector[genre_index(genre)] = 1.0
    return vector


def _person_key(person: str) -> str:
    # Names from different sources differ in case and spacing, not in identity.
    return " ".join(person.lower().split())


def _hash(token: str, dim: int) -> tuple[int, float]:
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    # Low bits pick the column, the top bit the sign: signed hashing keeps collisions
    # from adding up to a bias in the inner product.
    return value % dim, 1.0 if value >> 63 == 0 else -1.0


def cast_weight(position: int) -> float:
    """Weight of the actor billed at ``position`` (0-based): 1 for leads, then decaying."""
    if position < LEAD_CAST:
        return 1.0
    return float(SUPPORTING_CAST_DECAY ** (position - LEAD_CAST + 1))


def people_tokens(people: People) -> list[tuple[str, float]]:
    """Role-prefixed people (``director:``, ``cast:``, ``writer:``) and their weights."""
    tokens: list[tuple[str, float]] = []
    for person in people.directors:
        if person.strip():
            tokens.append((f"director:{_person_key(person)}", DIRECTOR_WEIGHT))
    cast = [p for p in people.cast if p.strip()][:MAX_CAST]
    for position, person in enumerate(cast):
        tokens.append((f"cast:{_person_key(person)}", cast_weight(position)))
    for person in people.writers:
        if person.strip():
            tokens.append((f"writer:{_person_key(person)}", WRITER_WEIGHT))
    return tokens


def people_features(people: People, dim: int = PEOPLE_DIM) -> Vector | None:
    """Signed feature hashing of a movie's people into ``dim`` float32 columns.

    Ids or names both work (Freebase ids identify a person as well as a name does).
    Returns None when the movie names no one.
    """
    tokens = people_tokens(people)
    if not tokens:
        return None
    vector = np.zeros(dim, dtype=np.float32)
    for token, weight in tokens:
        column, sign = _hash(token, dim)
        vector[column] += sign * weight
    if not vector.any():
        # Opposite signs of two people cancelled exactly: still a movie with people, so
        # keep a trace instead of reporting the modality as missing.
        column, _ = _hash(tokens[0][0], dim)
        vector[column] = tokens[0][1]
    return vector
