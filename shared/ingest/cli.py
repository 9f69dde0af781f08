"""Command line of the ingest service (``python -m services.ingest <command>``).

Commands:
  replay          publish MovieLens-100K: the movies, then the ratings in time order
  publish-rating  publish one rating
  publish-movie   publish one movie
  serve           run the HTTP gateway (POST /ratings, POST /movies, GET /health)

Settings come from the environment (KAFKA_BOOTSTRAP_SERVERS, REELSTREAM_TOPIC_PREFIX,
INGEST_HTTP_PORT, ...; see shared/config.py). Results go to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaException

from shared.config import Settings
from shared.data import DatasetError, load_movielens
from shared.events import MOVIES, RATINGS, TopicSpec, decode, encode
from shared.exceptions import ConfigurationError, InvalidEventError
from shared.ingest import SERVICE
from shared.kafka.message import Outgoing
from shared.kafka.publisher import DeliveryError, Publisher
from shared.logs import configure_logging, log_above_progress_bars

log = logging.getLogger(__name__)

DEFAULT_DATASET = Path("data/ml-100k")


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status (0 ok, 1 failed, 2 bad input)."""
    args = _parser().parse_args(argv)
    configure_logging(SERVICE)
    log_above_progress_bars()
    settings = Settings()
    try:
        return int(args.run(settings, args))
    except (InvalidEventError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (DeliveryError, KafkaException) as exc:
        print(
            f"error: could not publish to {settings.kafka_bootstrap_servers}: {exc}",
            file=sys.stderr,
        )
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = commands.add_parser(
        "replay",
        help="publish MovieLens-100K movies and ratings",
        description="Publish every movie, then the ratings in time order (key: user id). "
        "The default dataset is fetched by `make data`; the official GroupLens folder "
        "(unzipped ml-100k.zip from grouplens.org/datasets/movielens/100k/) works too.",
    )
    replay.add_argument(
        "--dataset",
        type=Path,
        default=DEFAULT_DATASET,
        help="RecBole atomic files or the GroupLens ml-100k folder [%(default)s]",
    )
    replay.add_argument("--limit", type=int, help="replay only the first N ratings")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="ratings per second (default: full speed)")
    pace.add_argument(
        "--time-scale",
        type=float,
        help="keep the real gaps between ratings divided by X (3600: an hour a second)",
    )
    part = replay.add_mutually_exclusive_group()
    part.add_argument("--movies-only", action="store_true", help="publish only the movies")
    part.add_argument("--ratings-only", action="store_true", help="publish only the ratings")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.add_argument(
        "--embed-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="between movies and ratings, wait this long for the movies' vectors on "
        "item-embeddings (0: do not wait) [%(default)s]",
    )
    replay.set_defaults(run=_replay)

    rating = commands.add_parser("publish-rating", help="publish one rating")
    rating.add_argument("user_id", metavar="USER")
    rating.add_argument("movie_id", metavar="MOVIE")
    rating.add_argument("rating", metavar="RATING", type=float, help="stars, 0.5 to 5.0")
    rating.add_argument("--at", help="when: ISO-8601 or epoch seconds (default: now)")
    rating.add_argument("--event-id", help="event id (default: a random one)")
    rating.set_defaults(run=_publish_rating)

    movie = commands.add_parser("publish-movie", help="publish one movie")
    movie.add_argument("movie_id", metavar="MOVIE_ID")
    movie.add_argument("title", metavar="TITLE")
    movie.add_argument("--year", type=int)
    movie.add_argument("--genre", dest="genres", action="extend", nargs="+", default=[])
    movie.add_argument("--overview", default="")
    movie.add_argument("--director", dest="directors", action="extend", nargs="+", default=[])
    movie.add_argument("--cast", action="extend", nargs="+", default=[], help="lead actor first")
    movie.add_argument("--writer", dest="writers", action="extend", nargs="+", default=[])
    movie.add_argument("--poster", help="local path, http(s) URL or data: URI of the poster")
    movie.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra metadata (string values); repeatable",
    )
    movie.set_defaults(run=_publish_movie)

    serve = commands.add_parser("serve", help="run the HTTP gateway")
    serve.add_argument("--host", default="127.0.0.1", help="[%(default)s]")
    serve.add_argument("--port", type=int, help="default: INGEST_HTTP_PORT (8080)")
    serve.set_defaults(run=_serve)
    return parser


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    # Imported here: tqdm and the replay loop are not needed by the other commands.
    from shared.replay import replay

    if not args.dataset.is_dir():
        raise DatasetError(
            f"no dataset at {args.dataset}: run `make data` to fetch MovieLens-100K, or pass "
            "--dataset with the GroupLens ml-100k folder"
        )
    dataset = load_movielens(args.dataset)
    stats = replay(
        settings,
        dataset,
        limit=args.limit,
        rate=args.rate,
        time_scale=args.time_scale,
        progress=not args.no_progress,
        movies=not args.ratings_only,
        ratings=not args.movies_only,
        embed_timeout_s=args.embed_timeout,
    )
    print(
        f"published movies={stats.movies} ratings={stats.ratings} "
        f"to {settings.topic(MOVIES.name)}, {settings.topic(RATINGS.name)} "
        f"in {stats.wall_s:.2f}s ({stats.events_per_s:,.0f} events/s)"
        + (f", after {stats.embed_wait_s:.1f}s waiting for vectors" if stats.embed_wait_s else "")
        + (" [interrupted]" if stats.interrupted else "")
    )
    return 130 if stats.interrupted else 0


def _publish_rating(settings: Settings, args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {
        "user_id": args.user_id,
        "movie_id": args.movie_id,
        "rating": args.rating,
        "occurred_at": _instant(args.at) if args.at else datetime.now(UTC).isoformat(),
    }
    if args.event_id is not None:
        fields["event_id"] = args.event_id
    return _publish_one(settings, RATINGS, fields)


def _publish_movie(settings: Settings, args: argparse.Namespace) -> int:
    metadata = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--meta wants KEY=VALUE, got {item!r}")
        metadata[key] = value
    fields: dict[str, Any] = {
        "movie_id": args.movie_id,
        "title": args.title,
        "year": args.year,
        "genres": args.genres,
        "overview": args.overview,
        "people": {"directors": args.directors, "cast": args.cast, "writers": args.writers},
        "poster": args.poster,
        "metadata": metadata,
    }
    return _publish_one(settings, MOVIES, fields)


def _publish_one(settings: Settings, spec: TopicSpec, fields: dict[str, Any]) -> int:
    from shared.replay import check_topics

    # The same validation path as the topics' consumers and the HTTP gateway.
    event = decode(spec.record, orjson.dumps(fields))
    publisher = Publisher(settings)
    check_topics(publisher, settings, [spec])
    publisher.publish(Outgoing(spec, event))
    publisher.flush(timeout_s=30.0)
    print(encode(event).decode())
    return 0


def _instant(text: str) -> float | str:
    """Epoch seconds as a number, anything else as ISO-8601 text for the model to read."""
    try:
        return float(text)
    except ValueError:
        return text


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from shared.ingest.gateway import serve

    asyncio.run(serve(settings, host=args.host, port=args.port))
    return 0
