"""Small MovieLens-100K folders written by tests, in both layouts the loader reads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

GENRE_ORDER = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]

CHILDRENS = "Children's"

RECBOLE_ITEMS = [
    ("1", "Toy Story", "1995", "Animation Children's Comedy"),
    ("2", "GoldenEye", "1995", "Action Adventure Thriller"),
    # RecBole split "... (1995) (V)" badly: the year stayed in the title, "V" in the field.
    ("3", "Land Before Time III: The Time of the Great Giving (1995)", "V", "Animation"),
    ("4", "Misérables, Les", "1995", "Drama Musical"),
    ("5", "unkonwn", "unkonwn", "unknown"),
]

# (user, item, rating, timestamp) in file order: not time-sorted, with equal timestamps.
RECBOLE_RATINGS = [
    ("196", "1", "3", "881250950"),
    ("186", "2", "4", "881250949"),
    ("196", "3", "1", "881250949"),
    ("22", "4", "5", "881250960"),
    ("186", "1", "2", "881250940"),
    ("22", "5", "4.5", "881250960"),
]

# Film m.toy is item 1, m.gold item 2; m.other is in the graph but not linked.
RECBOLE_KG = [
    ("m.toy", "film.film.actor", "m.hanks"),
    ("m.lasseter", "film.director.film", "m.toy"),
    ("m.toy", "film.film.directed_by", "m.lasseter"),
    ("m.toy", "film.film.actor", "m.allen"),
    ("m.toy", "film.film.written_by", "m.whedon"),
    ("m.toy", "film.film.actor", "m.hanks"),
    ("m.toy", "film.film.genre", "m.animation"),
    ("m.hanks", "film.actor.film", "m.toy"),
    ("m.gold", "film.film.actor", "m.brosnan"),
    ("m.gold", "film.film.directed_by", "m.campbell"),
    ("m.other", "film.film.actor", "m.nobody"),
]
RECBOLE_LINKS = [("1", "m.toy"), ("2", "m.gold")]


def _atomic(path: Path, header: str, rows: Sequence[tuple[str, ...]]) -> None:
    lines = [header] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_recbole(
    folder: Path,
    *,
    ratings: list[tuple[str, str, str, str]] | None = None,
    items: list[tuple[str, str, str, str]] | None = None,
    knowledge_graph: bool = True,
) -> Path:
    """RecBole atomic files ``ml-100k.{inter,item,kg,link}`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(
        folder / "ml-100k.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        list(RECBOLE_RATINGS if ratings is None else ratings),
    )
    _atomic(
        folder / "ml-100k.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        list(RECBOLE_ITEMS if items is None else items),
    )
    if knowledge_graph:
        _atomic(
            folder / "ml-100k.kg", "head_id:token\trelation_id:token\ttail_id:token", RECBOLE_KG
        )
        _atomic(folder / "ml-100k.link", "item_id:token\tentity_id:token", RECBOLE_LINKS)
    return folder


def generated_ratings(n: int, users: int = 5, items: int = 5) -> list[tuple[str, str, str, str]]:
    """``n`` deterministic rating rows over the items of ``RECBOLE_ITEMS``, with many
    equal timestamps and not in time order."""
    return [
        (
            str(1 + (i * 7) % users),
            str(1 + (i * 3) % items),
            str(1 + i % 5),
            str(881_000_000 + (i * 37) % 50),
        )
        for i in range(n)
    ]


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in GENRE_ORDER)


def write_grouplens(folder: Path) -> Path:
    """The GroupLens files ``u.data`` and ``u.item`` (latin-1) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    imdb = "http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"
    items = [
        f"1|Toy Story (1995)|01-Jan-1995||{imdb}|{_flags('Animation', CHILDRENS, 'Comedy')}",
        f"267|unknown||||{_flags('unknown')}",
        "1412|Land Before Time III: The Time of the Great Giving (1995) (V)|01-Jan-1995||"
        f"|{_flags('Animation', CHILDRENS)}",
        f"543|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags('Drama', 'Musical')}",
        f"99|Mystery Film|12-Mar-1993|20-Apr-1994||{_flags('Mystery')}",
    ]
    (folder / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    data = [
        ("5", "1", "4", "875000010"),
        ("7", "267", "1", "875000000"),
        ("5", "543", "5", "875000010"),
        ("7", "99", "3", "874999999"),
    ]
    (folder / "u.data").write_text("\n".join("\t".join(r) for r in data) + "\n")
    return folder
