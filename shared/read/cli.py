"""``python -m services.api``: the read API server, and two commands that ask it.

- ``serve``: start the views and the HTTP server (``API_HOST``:``API_HTTP_PORT``) until
  SIGTERM or SIGINT.
- ``recommend --user 196``: print the user's current top-10 with titles.
- ``similar --movie 50 [--k 10] [--genre Drama] [--year 1995]``: print the movies
  nearest to one.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import uvicorn

from shared.config import Settings
from shared.logs import configure_logging
from shared.metrics import HealthServer
from shared.read import SERVICE
from shared.read.app import create_app
from shared.read.views import ReadViews

log = logging.getLogger(__name__)

READY_EVERY_S = 2.0
"""How often (seconds) the server rewrites its ready file while its views are ready."""

REQUEST_TIMEOUT_S = 10.0


def serve(settings: Settings) -> int:
    views = ReadViews(settings).start()
    stop = threading.Event()
    keeper = threading.Thread(
        target=_keep_ready, args=(settings, views, stop), name="ready-file", daemon=True
    )
    keeper.start()
    health = HealthServer(settings, SERVICE, alive=lambda: True, ready=views.ready).start()
    log.info(
        "service=%s listening host=%s port=%d", SERVICE, settings.api_host, settings.api_http_port
    )
    # uvicorn stops serving on SIGTERM or SIGINT, then raises the signal again for the
    # handler it found: this one logs it, so that the views stop and the ready file goes.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped_by)
    try:
        uvicorn.run(
            create_app(views),
            host=settings.api_host,
            port=settings.api_http_port,
            log_level="warning",
        )
    finally:
        stop.set()
        health.stop()
        settings.ready_file(SERVICE).unlink(missing_ok=True)
        views.stop()
    return 0


def _stopped_by(signum: int, _frame: object) -> None:
    log.info("signal=%s service=%s stopping", signal.Signals(signum).name, SERVICE)


def _keep_ready(settings: Settings, views: ReadViews, stop: threading.Event) -> None:
    ready_file = settings.ready_file(SERVICE)
    while not stop.wait(0 if not ready_file.exists() and views.ready() else READY_EVERY_S):
        if views.ready():
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            ready_file.write_text(str(time.time()))
        else:
            ready_file.unlink(missing_ok=True)
            stop.wait(0.2)


def get(settings: Settings, path: str, **query: Any) -> Any:
    """GET ``path`` of the running API; its JSON body. Raises ``SystemExit`` with the
    API's reason on an error status, or when nothing answers."""
    params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    url = f"http://{host}:{settings.api_http_port}{path}" + (f"?{params}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("detail", exc.reason)
        raise SystemExit(f"{exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(
            f"no read API at {url} ({exc.reason}): is the stack up (`make up`)?"
        ) from None


def print_recommendations(body: dict[str, Any]) -> None:
    note = " (newcomers' list: no rating yet)" if body["for_newcomers"] else ""
    print(
        f"user {body['user_id']}{note}, model {body['model_version']}, "
        f"generated {body['generated_at']}"
    )
    for rank, item in enumerate(body["items"], 1):
        stars = "" if item["predicted_rating"] is None else f"  {item['predicted_rating']:.1f}★"
        print(f"{rank:3d}. {item['title']}  [{item['movie_id']}]  score {item['score']:.3f}{stars}")


def print_similar(body: dict[str, Any], title: str) -> None:
    print(f"more like {title} [{body['movie_id']}]:")
    for rank, item in enumerate(body["items"], 1):
        print(f"{rank:3d}. {item['title']}  [{item['movie_id']}]  similarity {item['score']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.api",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the read API until SIGTERM or SIGINT")
    recommend = commands.add_parser("recommend", help="print a user's current list")
    recommend.add_argument("--user", required=True)
    similar = commands.add_parser("similar", help="print the movies nearest to one")
    similar.add_argument("--movie", required=True)
    similar.add_argument("--k", type=int, default=10)
    similar.add_argument("--genre")
    similar.add_argument("--year", type=int)
    args = parser.parse_args(argv)
    settings = Settings()
    if args.command == "serve":
        configure_logging(SERVICE)
        return serve(settings)
    user = urllib.parse.quote(args.user if args.command == "recommend" else "", safe="")
    if args.command == "recommend":
        print_recommendations(get(settings, f"/users/{user}/recommendations"))
        return 0
    movie = urllib.parse.quote(args.movie, safe="")
    title = get(settings, f"/movies/{movie}")["title"]
    print_similar(
        get(settings, f"/movies/{movie}/similar", k=args.k, genre=args.genre, year=args.year), title
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
