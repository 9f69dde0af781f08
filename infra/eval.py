"""``make eval``: protocol T1 on MovieLens-100K for reelstream and its baselines.

    python -m infra.eval run [--test-limit N] [--models a,b] [--variants all-items,mid-stream]
    python -m infra.eval stream [--test-limit N]     # through the running stack (make up)

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

from shared.config import Settings
from shared.data.movielens import MovieLens, load_movielens
from shared.evaluation.baselines import MostPopular, OnlineMF, OnlinePopularity
from shared.evaluation.harness import VARIANTS, ModelRun, Variant, evaluate, mmr_sweep
from shared.evaluation.metrics import K
from shared.evaluation.model import EvalModel
from shared.evaluation.pipeline import PipelineModel
from shared.evaluation.report import (
    markdown_table,
    plot_mmr_tradeoff,
    plot_rolling_ndcg,
    sweep_table,
    write_json,
)
from shared.evaluation.split import Split, temporal_split
from shared.models.item_encoder import ItemEncoder, build_item_encoder
from shared.models.updater import RatingWeightedMean

log = logging.getLogger("infra.eval")

MODELS = ("most-popular", "online-popularity", "online-mf", "content-knn")
"""Every model ``make eval`` scores, in table order."""

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

    @property
    def encoder(self) -> ItemEncoder:
        if self._encoder is None:
            self._encoder = build_item_encoder(self.settings)
        return self._encoder

    def build(self, name: str) -> EvalModel:
        builders: dict[str, Callable[[], EvalModel]] = {
            "most-popular": lambda: MostPopular(),
            "online-popularity": lambda: OnlinePopularity(),
            "online-mf": lambda: OnlineMF(seed=self.seed),
            "content-knn": lambda: PipelineModel(
                self.settings, self.encoder, RatingWeightedMean(), name="content-knn"
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
                if isinstance(model, PipelineModel) and variant == "all-items" and lambdas:
                    sweep = mmr_sweep(model, run, dataset.movies, split, lambdas)
                run.snapshots = []  # the sweep is done; free the recorded profiles
            finally:
                if isinstance(model, PipelineModel):
                    model.close()
    return runs, sweep


def command_line() -> str:
    return "python -m infra.eval " + shlex.join(sys.argv[1:])


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
        plot_mmr_tradeoff(sweep, path, deployed_lambda)
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
        lines += ["## MMR lambda trade-off (content-knn, all-items)", "", sweep_table(sweep)]
        lines += [f"![MMR trade-off]({name}-mmr.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    written.append(out / f"{name}.md")
    return written


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = Settings()
    dataset = load_movielens(args.dataset)
    split = temporal_split(dataset.ratings, train_fraction=args.train_fraction)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants: list[Variant] = []
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        variants.append(v)
    lambdas = [] if args.no_sweep else list(LAMBDAS)
    factory = ModelFactory(settings, args.seed)
    runs, sweep = run_models(
        factory,
        dataset,
        split,
        models,
        variants,
        test_limit=args.test_limit,
        lambdas=lambdas,
        progress=not args.quiet,
    )
    name = args.name or (
        "eval-t1" if args.test_limit is None else f"eval-t1-first{args.test_limit}"
    )
    meta = {
        "protocol": "T1",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.eval", description=__doc__.split("\n")[0]
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
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
