"""``make eval``: protocol T1 on MovieLens-100K for reelstream and its baselines.

    python -m infra.lab.eval run [--test-limit N] [--models a,b] [--variants all-items,mid-stream]
    python -m infra.lab.eval stream [--test-limit N]     # through the running stack (make up)

``run`` drives every model in process over the TEST stream (test-then-learn) and writes
``reports/<name>.md``, ``.json``, ``-ndcg.png`` (rolling NDCG@10) and ``-mmr.png`` (the
MMR lambda trade-off). ``stream`` replays TRAIN and a TEST prefix through Kafka and the
four services, reads the lists back from ``recommendations``, and compares them with
the in-process run of the same prefix (``reports/eval-stream.md`` / ``.json``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from infra.lab.evaluation.baselines import MostPopular, OnlineMF, OnlinePopularity
from infra.lab.evaluation.harness import VARIANTS, ModelRun, Variant, evaluate, mmr_sweep
from infra.lab.evaluation.metrics import K, Scoreboard, genre_vectors
from infra.lab.evaluation.model import EvalModel
from infra.lab.evaluation.pipeline import PipelineModel
from infra.lab.evaluation.report import (
    markdown_table,
    plot_mmr_tradeoff,
    plot_rolling_ndcg,
    sweep_table,
    write_json,
)
from infra.lab.evaluation.split import Split, arrivals, temporal_split
from infra.lab.evaluation.stream import StreamResult, run_stream
from shared.config import Settings
from shared.data.movielens import MovieLens, load_movielens
from shared.logs import log_above_progress_bars
from shared.models.deployed import (
    ITEM_ENCODER,
    RANKER,
    USER_UPDATER,
    build_deployed_item_encoder,
    build_reranker,
    build_user_updater,
)
from shared.models.item_encoder import ItemEncoder, build_item_encoder
from shared.models.updater import RatingWeightedMean, UserState, shrunk_mean_rating

log = logging.getLogger("infra.lab.eval")

BASELINES = ("most-popular", "online-popularity", "online-mf", "content-knn")
"""The baselines: they need no checkpoint."""

TRAINED = ("fusion-mean", "reelstream-no-ranker", "reelstream-no-pull", "reelstream")
"""The trained stack and its ablations (checkpoints from ``make train``):
``fusion-mean`` = trained item encoder + rating-weighted mean, no ranker;
``reelstream-no-ranker`` = trained encoder + residual updater, candidates by cosine;
``reelstream-no-pull`` = the deployed stack with every item vector left as encoded;
``reelstream`` = the deployed stack: encoder + residual updater + two-tower ranker, and
ratings pull the vectors of movies the encoder did not learn from ratings
(``settings.item_pull``). The baselines and ``fusion-mean`` leave item vectors as
encoded: they are the systems their names say."""

MODELS = (*BASELINES, *TRAINED)
"""Every model ``make eval`` scores, in table order (trained ones only when their
checkpoints exist)."""

LAMBDAS = tuple(round(0.1 * i, 1) for i in range(11))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (the text encoder runs in eval mode, but to be sure)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ModelFactory:
    """Builds the models by name; the item encoder is loaded once and shared."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.settings = settings
        self.seed = seed
        self._encoder: ItemEncoder | None = None

        self._trained: ItemEncoder | None = None

    @property
    def encoder(self) -> ItemEncoder:
        """The baseline concat encoder (content-knn)."""
        if self._encoder is None:
            self._encoder = build_item_encoder(self.settings)
        return self._encoder

    @property
    def trained_encoder(self) -> ItemEncoder:
        """The deployed item encoder: the trained fusion encoder from ``models/``."""
        if self._trained is None:
            self._trained = build_deployed_item_encoder(self.settings)
        return self._trained

    def available(self, names: Sequence[str]) -> list[str]:
        """``names`` without the trained models when ``make train`` has not run."""
        missing = [
            n for n in (ITEM_ENCODER, USER_UPDATER, RANKER) if self.settings.checkpoint(n) is None
        ]
        if not missing:
            return list(names)
        skipped = [n for n in names if n in TRAINED]
        if skipped:
            log.warning(
                "no checkpoint for %s in %s (run `make train`): skipping %s",
                ", ".join(missing),
                self.settings.models_dir,
                ", ".join(skipped),
            )
        return [n for n in names if n not in TRAINED]

    def build(self, name: str) -> EvalModel:
        unpulled = self.settings.model_copy(update={"item_pull": 0.0})
        builders: dict[str, Callable[[], EvalModel]] = {
            "most-popular": lambda: MostPopular(),
            "online-popularity": lambda: OnlinePopularity(),
            "online-mf": lambda: OnlineMF(seed=self.seed),
            "content-knn": lambda: PipelineModel(
                unpulled, self.encoder, RatingWeightedMean(), name="content-knn"
            ),
            "fusion-mean": lambda: PipelineModel(
                unpulled, self.trained_encoder, RatingWeightedMean(), name="fusion-mean"
            ),
            "reelstream-no-ranker": lambda: PipelineModel(
                self.settings,
                self.trained_encoder,
                build_user_updater(self.settings),
                name="reelstream-no-ranker",
            ),
            "reelstream-no-pull": lambda: PipelineModel(
                unpulled,
                self.trained_encoder,
                build_user_updater(self.settings),
                reranker=build_reranker(self.settings),
                name="reelstream-no-pull",
            ),
            "reelstream": lambda: PipelineModel(
                self.settings,
                self.trained_encoder,
                build_user_updater(self.settings),
                reranker=build_reranker(self.settings),
                name="reelstream",
            ),
        }
        if name not in builders:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        return builders[name]()


def describe_data(dataset: MovieLens, split: Split) -> dict[str, Any]:
    test_users = {r.user_id for r in split.test}
    return {
        "path": str(dataset.path),
        "format": dataset.format,
        "movies": len(dataset.movies),
        "ratings": len(dataset.ratings),
        "train": len(split.train),
        "test": len(split.test),
        "test_users": len(test_users),
        "cold_test_users": sum(split.is_cold_user(u) for u in test_users),
        "cold_test_items": len({r.movie_id for r in split.test if split.is_cold_item(r.movie_id)}),
    }


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def run_models(
    factory: ModelFactory,
    dataset: MovieLens,
    split: Split,
    models: Sequence[str],
    variants: Sequence[Variant],
    *,
    test_limit: int | None,
    lambdas: Sequence[float],
    progress: bool,
    sweep_model: str = "content-knn",
) -> tuple[list[ModelRun], list[dict[str, Any]]]:
    """Every (variant, model) run, and the MMR sweep of content-knn on all-items."""
    runs: list[ModelRun] = []
    sweep: list[dict[str, Any]] = []
    for variant in variants:
        for name in models:
            seed_everything(factory.seed)
            model = factory.build(name)
            try:
                run = evaluate(
                    model,
                    dataset.movies,
                    split,
                    variant=variant,
                    test_limit=test_limit,
                    progress=progress,
                )
                runs.append(run)
                if (
                    name == sweep_model
                    and isinstance(model, PipelineModel)
                    and variant == "all-items"
                    and lambdas
                ):
                    sweep = mmr_sweep(model, run, dataset.movies, split, lambdas)
                run.snapshots = []  # the sweep is done; free the recorded profiles
            finally:
                if isinstance(model, PipelineModel):
                    model.close()
    return runs, sweep


def command_line() -> str:
    return "python -m infra.lab.eval " + shlex.join(sys.argv[1:])


def write_run_reports(
    out: Path,
    name: str,
    runs: Sequence[ModelRun],
    sweep: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    deployed_lambda: float,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    by_variant: dict[str, list[ModelRun]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    plots: dict[str, Path] = {}
    for variant, group in by_variant.items():
        path = out / f"{name}-ndcg{'' if variant == 'all-items' else '-' + variant}.png"
        plot_rolling_ndcg(group, path)
        plots[variant] = path
        written.append(path)
    if sweep:
        path = out / f"{name}-mmr.png"
        plot_mmr_tradeoff(sweep, path, deployed_lambda, meta.get("sweep_model", "content-knn"))
        written.append(path)

    document = {**meta, "runs": [run.as_dict() for run in runs], "mmr_sweep": list(sweep)}
    write_json(out / f"{name}.json", document)
    written.append(out / f"{name}.json")

    data = meta["data"]
    lines = [
        f"# Protocol T1 on MovieLens-100K ({name})",
        "",
        f"Command: `{meta['command']}` ({meta['finished_at']}, {meta['wall_s']:.0f} s wall,"
        f" {meta['environment']['cpus']} CPUs).",
        "",
        f"Data: {data['ratings']:,} ratings, {data['movies']:,} movies; TRAIN {data['train']:,},"
        f" TEST {data['test']:,} (scored: {meta['test_events_scored']:,});"
        f" {data['cold_test_users']} of {data['test_users']} test users and"
        f" {data['cold_test_items']} test movies have no TRAIN rating.",
        f"Lists: top-{meta['k']}, retrieve {meta['settings']['n_candidates']} candidates,"
        f" MMR lambda {meta['settings']['mmr_lambda']:g}; seed {meta['seed']}.",
        "",
        markdown_table(runs),
    ]
    for variant, path in plots.items():
        lines += [f"![rolling NDCG@10, {variant}]({path.name})", ""]
    if sweep:
        lines += [
            f"## MMR lambda trade-off ({meta.get('sweep_model', 'content-knn')}, all-items)",
            "",
            sweep_table(sweep),
        ]
        lines += [f"![MMR trade-off]({name}-mmr.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    written.append(out / f"{name}.md")
    return written


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = Settings()
    dataset = load_movielens(args.dataset)
    split = temporal_split(dataset.ratings, train_fraction=args.train_fraction)
    if args.validation:
        # Model selection: TRAIN's first 90% as "TRAIN", its last 10% as "TEST".
        split = split.validation(0.1)
    factory = ModelFactory(settings, args.seed)
    models = factory.available([m.strip() for m in args.models.split(",") if m.strip()])
    variants: list[Variant] = []
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        variants.append(v)
    lambdas = [] if args.no_sweep else list(LAMBDAS)
    if args.sweep_model not in models:
        args.sweep_model = "content-knn"
    runs, sweep = run_models(
        factory,
        dataset,
        split,
        models,
        variants,
        test_limit=args.test_limit,
        lambdas=lambdas,
        progress=not args.quiet,
        sweep_model=args.sweep_model,
    )
    stem = "eval-validation" if args.validation else "eval-t1"
    name = args.name or (stem if args.test_limit is None else f"{stem}-first{args.test_limit}")
    meta = {
        "protocol": "T1",
        "scored": "validation: last 10% of TRAIN" if args.validation else "TEST",
        "sweep_model": args.sweep_model,
        "command": command_line(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "seed": args.seed,
        "k": K,
        "train_fraction": args.train_fraction,
        "test_events_scored": runs[0].summary["n_events"] if runs else 0,
        "data": describe_data(dataset, split),
        "settings": {
            "top_k": settings.top_k,
            "n_candidates": settings.n_candidates,
            "mmr_lambda": settings.mmr_lambda,
            "item_pull": settings.item_pull,
            "batch_size": settings.batch_size,
            "text_model": str(settings.text_model),
            "clip_weights": None if settings.clip_weights is None else str(settings.clip_weights),
        },
        "environment": environment(),
    }
    written = write_run_reports(args.out, name, runs, sweep, meta, settings.mmr_lambda)
    print(markdown_table(runs))
    if sweep:
        print(sweep_table(sweep))
    print(f"wall {meta['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def compare_stream(
    dataset: MovieLens, split: Split, streamed: StreamResult, in_process: ModelRun
) -> dict[str, Any]:
    """Score the lists read back from ``recommendations`` and compare them, event by
    event, with the in-process lists of the same TEST prefix."""
    board = Scoreboard(
        k=K, catalogue_size=len(dataset.movies), genre_vectors=genre_vectors(dataset.movies)
    )
    prior = shrunk_mean_rating(UserState())
    assert in_process.lists is not None and in_process.predictions is not None
    same_list = same_top1 = same_movies = 0
    differences: list[dict[str, Any]] = []
    for i, (event, local) in enumerate(zip(streamed.events, in_process.lists, strict=True)):
        recommended = (event.recommended or [])[:K]
        rating = event.rating
        board.add(
            recommended=recommended,
            target=rating.movie_id,
            rating=rating.rating,
            # Without a list the stream has no prediction; the in-process model then
            # predicts the prior too, so the two stay comparable.
            predicted=prior if event.predicted is None else event.predicted,
            cold_user=split.is_cold_user(rating.user_id),
            cold_item=split.is_cold_item(rating.movie_id),
        )
        if recommended == local:
            same_list += 1
        elif sorted(recommended) == sorted(local):
            same_movies += 1
        if recommended != local and len(differences) < 10:
            differences.append(
                {
                    "test_event": i,
                    "user_id": rating.user_id,
                    "stream": recommended,
                    "in_process": local,
                    "exact": event.exact,
                }
            )
        same_top1 += recommended[:1] == local[:1]
    n = len(streamed.events)
    return {
        "stream": board.summary(),
        "in_process": in_process.summary,
        "events": n,
        "identical_lists": same_list,
        "identical_first_item": same_top1,
        "same_movies_other_order": same_movies,
        "stream_fresh": streamed.fresh,
        "exact_lists": sum(e.exact for e in streamed.events),
        "no_list": sum(e.recommended is None for e in streamed.events),
        "timeouts": streamed.timeouts,
        "first_differences": differences,
        "stream_wall_s": streamed.wall_s,
        "in_process_wall_s": in_process.fit_s + in_process.test_s,
        "run_id": streamed.run_id,
    }


def cmd_stream(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = Settings()
    dataset = load_movielens(args.dataset)
    split = temporal_split(dataset.ratings)
    test = split.test[: args.test_limit]
    variant: Variant = args.variant
    movies = list(dataset.movies)
    arriving: dict[str, int] | None = None
    if variant == "mid-stream":
        first = arrivals(split)
        arriving = {m: i for m, i in first.items() if i < len(test)}
        # Like the in-process run: a new release that arrives after the prefix never does.
        movies = [m for m in movies if m.movie_id not in first or m.movie_id in arriving]
    log.info(
        "stream run: %d TRAIN + %d TEST ratings through %s",
        len(split.train),
        len(test),
        settings.kafka_bootstrap_servers,
    )
    streamed = run_stream(
        settings, movies, split.train, test, arrivals=arriving, progress=not args.quiet
    )
    seed_everything(args.seed)
    factory = ModelFactory(settings, args.seed)
    # The stack runs the deployed models: the trained ones when models/ has them.
    deployed = "reelstream" if "reelstream" in factory.available(["reelstream"]) else "content-knn"
    model = factory.build(deployed)
    try:
        local = evaluate(
            model,
            dataset.movies,
            split,
            variant=variant,
            test_limit=len(test),
            keep_lists=True,
            progress=not args.quiet,
        )
    finally:
        if isinstance(model, PipelineModel):
            model.close()
    comparison = compare_stream(dataset, split, streamed, local)
    document = {
        "protocol": "T1",
        "mode": f"stream vs in-process ({deployed})",
        "model": deployed,
        "variant": variant,
        "command": command_line(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "broker": settings.kafka_bootstrap_servers,
        "arrivals": len(arriving or {}),
        "settings": {
            "top_k": settings.top_k,
            "n_candidates": settings.n_candidates,
            "mmr_lambda": settings.mmr_lambda,
            "item_pull": settings.item_pull,
        },
        **comparison,
    }
    name = args.name or ("eval-stream" if variant == "all-items" else f"eval-stream-{variant}")
    write_json(args.out / f"{name}.json", document)
    text = stream_markdown(document)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0


def stream_markdown(doc: dict[str, Any]) -> str:
    """The stream-vs-in-process comparison as Markdown."""
    rows = [
        "| mode | HR@10 | NDCG@10 | HR@10 liked | NDCG@10 liked | ILD@10 | coverage | RMSE | MAE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, key in (("Kafka stack", "stream"), ("in process", "in_process")):
        s = doc[key]
        seg = s["segments"]
        rows.append(
            f"| {label} | {seg['all']['hr']:.4f} | {seg['all']['ndcg']:.4f} | "
            f"{seg['liked']['hr']:.4f} | {seg['liked']['ndcg']:.4f} | {s['ild'] or 0:.4f} | "
            f"{s['coverage']:.3f} | {s['rmse']:.4f} | {s['mae']:.4f} |"
        )
    n = doc["events"]
    return "\n".join(
        [
            f"# Protocol T1: the Kafka stack against the in-process run "
            f"({doc.get('model', 'content-knn')}, {doc['variant']})",
            "",
            f"Command: `{doc['command']}` ({doc['finished_at']}, broker {doc['broker']}).",
            f"TRAIN replayed in full, then the first {n:,} TEST ratings in a closed loop"
            + (
                f"; {doc['arrivals']} new movies published just before their first rating."
                if doc["variant"] == "mid-stream"
                else "."
            ),
            "",
            *rows,
            "",
            f"- identical lists: {doc['identical_lists']:,} of {n:,}"
            f" (first item identical: {doc['identical_first_item']:,}; the same movies in"
            f" another order: {doc.get('same_movies_other_order', '-')})",
            f"- fresh stack (no earlier ratings in the movies' statistics):"
            f" {'yes' if doc.get('stream_fresh') else 'no'}",
            f"- lists caused by the user's previous rating: {doc['exact_lists']:,};"
            f" no list: {doc['no_list']:,}; time-outs: {doc['timeouts']}",
            f"- wall: stack {doc['stream_wall_s']:.0f} s, in process"
            f" {doc['in_process_wall_s']:.0f} s",
            "",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.lab.eval", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="protocol T1 in process, every model (make eval)")
    run.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    run.add_argument("--out", type=Path, default=Path("reports"))
    run.add_argument("--name", help="report file stem (default eval-t1[-firstN])")
    run.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    run.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    run.add_argument("--test-limit", type=int, help="score only the first N test events")
    run.add_argument("--train-fraction", type=float, default=0.8)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-sweep", action="store_true", help="skip the MMR lambda sweep")
    run.add_argument(
        "--sweep-model",
        default="reelstream-no-ranker",
        help="model whose lists the MMR sweep re-ranks (one ranked by cosine)",
    )
    run.add_argument(
        "--validation",
        action="store_true",
        help="score the last 10%% of TRAIN instead of TEST (for choosing settings)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    stream = sub.add_parser(
        "stream", help="TRAIN + a TEST prefix through the running stack, compared in process"
    )
    stream.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    stream.add_argument("--out", type=Path, default=Path("reports"))
    stream.add_argument("--name", help="report file stem (default eval-stream[-variant])")
    stream.add_argument("--test-limit", type=int, default=1000, help="TEST prefix length")
    stream.add_argument("--variant", choices=VARIANTS, default="all-items")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--quiet", action="store_true", help="no progress bars")
    stream.set_defaults(func=cmd_stream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log_above_progress_bars()
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
