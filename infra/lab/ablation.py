"""``make ablation``: what each part of the trained item encoder adds, on validation.

    python -m infra.lab.ablation [--dataset data/ml-100k] [--out reports] [--seed 0] [--quiet]
                             [--limit N] [--epochs E]

Protocol T1's TRAIN (the first 80% of ML-100K in time) is split again with
``Split.validation(0.1)``: every encoder below is trained on its first 90% and scored,
test-then-learn, on its last 10%. The TEST stream is never read. Each encoder step is
scored in the deployed pipeline (``PipelineModel``: the services' handlers, retrieval,
exclusion of rated movies, MMR at the settings' ``mmr_lambda``) with the same user model,
the rating-weighted mean of the rated movies' vectors, so only the item encoder changes
between rows:

1. ``content-knn``: the untrained concat encoder (MiniLM text + genres + hashed people);
2. ``fusion-triplet``: the fusion encoder trained on the triplet objective only;
3. ``fusion-interaction-text``: interaction objective only, text only (no metadata);
4. ``fusion-interaction``: + metadata;
5. ``fusion-all``: + triplet, i.e. every objective: the deployed ``FusionConfig()``.

Each fusion step is trained exactly as ``infra.lab.train`` trains the deployed encoder (same
data, seed and thread count), so step 5 reproduces ``models/item-encoder`` when that was
trained with the same code; the report says whether its version matches. Writes
``reports/ablation.md`` and ``reports/ablation.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from infra.lab.eval import describe_data, environment, seed_everything
from infra.lab.evaluation.harness import ModelRun, evaluate
from infra.lab.evaluation.metrics import K
from infra.lab.evaluation.pipeline import PipelineModel
from infra.lab.evaluation.report import write_json
from infra.lab.evaluation.split import Split, temporal_split
from infra.lab.training.fusion import FusionConfig, space_spread, train_fusion
from shared.config import Settings
from shared.data.movielens import load_movielens
from shared.events import MoviePublished
from shared.exceptions import ConfigurationError
from shared.logs import log_above_progress_bars
from shared.models.checkpoint import read_config
from shared.models.deployed import ITEM_ENCODER
from shared.models.device import resolve_device
from shared.models.fusion import KIND as FUSION_KIND
from shared.models.fusion import FusionItemEncoder
from shared.models.image import ImageEncoder, load_image_encoder
from shared.models.item_encoder import ItemEncoder, build_item_encoder
from shared.models.text import TextEncoder
from shared.models.updater import RatingWeightedMean

log = logging.getLogger("infra.lab.ablation")

VALIDATION_FRACTION = 0.1
"""Share of TRAIN scored (its last 10%), as ``infra.lab.train`` holds it out."""

REPORT_NAME = "ablation"
"""Stem of the report files under ``--out``."""

SKIPPED = {
    "content-knn-text": (
        "text only, untrained: not run; the concat encoder has no switch to drop its "
        "metadata blocks (ConcatItemEncoder always lays out text, genres and people, and "
        "BlockWeights must be positive)"
    ),
}
"""Ladder steps that cannot be built with the current encoders, and why."""


@dataclass(frozen=True)
class Step:
    """One rung of the ladder: an item encoder, scored with the rating-weighted mean."""

    name: str
    """Model name in the report, e.g. ``fusion-interaction``."""
    description: str
    """What the encoder is made of and trained on, for the table."""
    fusion: FusionConfig | None
    """The fusion encoder's training config; None is the untrained concat encoder."""


def ladder(base: FusionConfig | None = None) -> list[Step]:
    """The encoder steps in report order.

    Args:
        base: the fusion config the trained steps vary (default ``FusionConfig()``, the
            deployed one); only the three ``use_*`` switches are changed, so a smaller
            ``base`` (fewer epochs, narrower layers) gives a quick run of the same ladder.
    """
    cfg = base or FusionConfig()
    full = dataclasses.replace(cfg, use_metadata=True, use_triplet=True, use_interaction=True)
    return [
        Step("content-knn", "text + metadata, untrained (concat)", None),
        Step(
            "fusion-triplet",
            "fusion, text + metadata, triplet objective only",
            dataclasses.replace(full, use_interaction=False),
        ),
        Step(
            "fusion-interaction-text",
            "fusion, text only, interaction objective only",
            dataclasses.replace(full, use_metadata=False, use_triplet=False),
        ),
        Step(
            "fusion-interaction",
            "fusion, + metadata (interaction only)",
            dataclasses.replace(full, use_triplet=False),
        ),
        Step("fusion-all", "fusion, + triplet: all objectives (deployed)", full),
    ]


@dataclass
class StepResult:
    """A step's validation scores, its encoder and how its space is spread."""

    step: Step
    run: ModelRun
    encoder_version: str
    dim: int
    train_s: float
    """Wall seconds of ``train_fusion`` (0 for the untrained encoder)."""
    nn_cosine: float
    """Mean cosine of a movie to its nearest neighbour (``space_spread``)."""
    mean_cosine: float
    """Mean pairwise cosine of the movies (``space_spread``)."""
    history: dict[str, list[float]] | None = None
    """``train_fusion``'s per-epoch history (None for the untrained encoder)."""

    def metric(self, name: str, segment: str = "all") -> float | None:
        """``ndcg``/``hr`` of a segment, or ``ild``/``coverage`` (None when undefined)."""
        summary = self.run.summary
        value = summary["segments"][segment][name] if name in ("ndcg", "hr") else summary[name]
        return None if value is None else float(value)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the step, its encoder, timings, spread and the full summary."""
        return {
            "step": self.step.name,
            "description": self.step.description,
            "fusion_config": (
                None if self.step.fusion is None else dataclasses.asdict(self.step.fusion)
            ),
            "encoder_version": self.encoder_version,
            "dim": self.dim,
            "train_s": round(self.train_s, 1),
            "nn_cosine": self.nn_cosine,
            "mean_cosine": self.mean_cosine,
            "history": self.history,
            **self.run.as_dict(),
        }


def _score(
    settings: Settings,
    encoder: ItemEncoder,
    name: str,
    movies: Sequence[MoviePublished],
    split: Split,
    *,
    seed: int,
    limit: int | None,
    progress: bool,
) -> tuple[ModelRun, np.ndarray]:
    """The step's validation run and its catalogue's item vectors (in ``movies`` order)."""
    seed_everything(seed)
    model = PipelineModel(settings, encoder, RatingWeightedMean(), name=name)
    try:
        run = evaluate(model, movies, split, test_limit=limit, progress=progress)
        run.snapshots = []  # no MMR sweep here: free the recorded profiles
        index = model.catalogue.index
        if index is None:
            raise ConfigurationError(f"{name}: the catalogue is empty after the run")
        vectors = index.vectors([m.movie_id for m in movies])
    finally:
        model.close()
    return run, vectors


def run_ablation(
    settings: Settings,
    movies: Sequence[MoviePublished],
    split: Split,
    *,
    steps: Sequence[Step] | None = None,
    text_encoder: TextEncoder | None = None,
    image_encoder: ImageEncoder | None = None,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
) -> list[StepResult]:
    """Train and score every step of the ladder on ``split``.

    Args:
        settings: ``mmr_lambda``, ``n_candidates`` and ``top_k`` of the lists; the text
            and image models when the encoders are not given.
        movies: the catalogue (every movie is in it from the start).
        split: the split to train on (``split.train``) and score (``split.test``); pass
            the validation split, never protocol T1's TEST.
        steps: the ladder (default ``ladder()``, the deployed config's epochs).
        text_encoder: shared by the fusion steps (default: ``settings.text_model``).
        image_encoder: the poster encoder of the fusion steps (default: from settings).
        seed: of every fusion training and of every scored run.
        limit: score only the first ``limit`` events of ``split.test`` (all when None).
        progress: tqdm bars.

    Returns:
        One result per step, in ladder order.
    """
    threads = torch.get_num_threads()
    # As infra.lab.train: one thread was 5-10x faster than two on the shared 2-core machine,
    # and the thread count is part of what makes a training run reproducible.
    torch.set_num_threads(1)
    try:
        text = (
            text_encoder
            if text_encoder is not None
            else TextEncoder(settings.text_model, resolve_device(settings.device))
        )
        image = image_encoder if image_encoder is not None else load_image_encoder(settings)
        results = []
        for step in steps or ladder():
            results.append(
                _run_step(
                    settings, step, movies, split, text, image, seed, limit=limit, progress=progress
                )
            )
        return results
    finally:
        torch.set_num_threads(threads)


def _run_step(
    settings: Settings,
    step: Step,
    movies: Sequence[MoviePublished],
    split: Split,
    text: TextEncoder,
    image: ImageEncoder | None,
    seed: int,
    *,
    limit: int | None,
    progress: bool,
) -> StepResult:
    history: dict[str, list[float]] | None = None
    train_s = 0.0
    encoder: ItemEncoder
    if step.fusion is None:
        # The same encoder `make eval` scores as content-knn.
        encoder = build_item_encoder(settings)
    else:
        began = time.perf_counter()
        net, config, history = train_fusion(
            movies, split.train, text, image, config=step.fusion, seed=seed, progress=progress
        )
        train_s = time.perf_counter() - began
        encoder = FusionItemEncoder(net, config, text, image)
    run, vectors = _score(
        settings, encoder, step.name, movies, split, seed=seed, limit=limit, progress=progress
    )
    if history is not None:
        nn_cosine, mean_cosine = history["nn_cosine"][-1], history["mean_cosine"][-1]
    else:
        nn_cosine, mean_cosine = space_spread(
            torch.from_numpy(np.ascontiguousarray(vectors)), np.random.default_rng(seed)
        )
    result = StepResult(
        step=step,
        run=run,
        encoder_version=encoder.model_version,
        dim=encoder.dim,
        train_s=train_s,
        nn_cosine=float(nn_cosine),
        mean_cosine=float(mean_cosine),
        history=history,
    )
    log.info(
        "step=%s version=%s ndcg=%.4f hr=%.4f ild=%s coverage=%.3f train_s=%.1f nn_cosine=%.3f",
        step.name,
        result.encoder_version,
        result.metric("ndcg") or 0.0,
        result.metric("hr") or 0.0,
        result.metric("ild"),
        result.metric("coverage") or 0.0,
        train_s,
        result.nn_cosine,
    )
    return result


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(results: Sequence[StepResult]) -> str:
    """One row per step: NDCG@10 / HR@10 (all and liked), ILD@10, coverage, training
    seconds and the spread of the item space."""
    head = [
        "#",
        "step",
        "item encoder",
        f"NDCG@{K}",
        f"HR@{K}",
        f"NDCG@{K} liked",
        f"ILD@{K}",
        "coverage",
        "train s",
        "nn cos",
        "mean cos",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(results, start=1):
        cells = [
            str(i),
            f"`{r.step.name}`",
            r.step.description,
            _num(r.metric("ndcg")),
            _num(r.metric("hr")),
            _num(r.metric("ndcg", "liked")),
            _num(r.metric("ild")),
            _num(r.metric("coverage"), 3),
            "-" if r.step.fusion is None else f"{r.train_s:.0f}",
            _num(r.nn_cosine, 3),
            _num(r.mean_cosine, 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(
    out: Path, results: Sequence[StepResult], meta: dict[str, Any], name: str = REPORT_NAME
) -> list[Path]:
    """``<out>/<name>.json`` (meta, every step's summary and history) and ``<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    document = {**meta, "steps": [r.as_dict() for r in results], "skipped": dict(SKIPPED)}
    write_json(out / f"{name}.json", document)
    data = meta["data"]
    deployed = meta.get("deployed_item_encoder")
    last = results[-1] if results else None
    lines = [
        "# Item-encoder ablation on the validation split (protocol T1)",
        "",
        f"Command: `{meta['command']}` ({meta['finished_at']}, {meta['wall_s']:.0f} s wall,"
        f" {meta['environment']['cpus']} CPUs, torch threads 1).",
        "",
        f"Trained on the first {data['train']:,} ratings of TRAIN, scored test-then-learn on"
        f" the last {data['test']:,} (scored: {meta['events_scored']:,});"
        " protocol T1's TEST is never read.",
        f"Every row: the deployed pipeline with the rating-weighted-mean user model, top-"
        f"{meta['k']}, {meta['settings']['n_candidates']} candidates, MMR lambda"
        f" {meta['settings']['mmr_lambda']:g}; seed {meta['seed']}; fusion epochs"
        f" {meta['fusion_epochs']}.",
        "",
        markdown_table(results),
        "`nn cos` / `mean cos`: mean cosine of a movie to its nearest neighbour / of all"
        " pairs of movies (the fusion's last-epoch history; the same statistic computed on"
        " the catalogue for the untrained encoder). Lower means a more spread-out space.",
        "",
    ]
    if deployed and last is not None and last.step.fusion == FusionConfig():
        # Only the deployed config can reproduce the checkpoint (same data, seed, threads).
        same = "matches" if deployed == last.encoder_version else "does not match"
        lines += [
            f"Step {len(results)} ({last.encoder_version}) {same} the deployed checkpoint"
            f" ({deployed}).",
            "",
        ]
    for step, reason in SKIPPED.items():
        lines += [f"- `{step}`: {reason}."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return [out / f"{name}.json", out / f"{name}.md"]


def deployed_version(settings: Settings) -> str | None:
    """The version of the item encoder in ``models/`` (None when there is none)."""
    path = settings.checkpoint(ITEM_ENCODER)
    if path is None:
        return None
    try:
        return str(read_config(path, FUSION_KIND)["version"])
    except (ConfigurationError, KeyError) as exc:
        log.warning("cannot read the deployed item encoder at %s: %s", path, exc)
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.lab.ablation", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--limit", type=int, help="score only the first N validation events (smoke runs)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help="fusion epochs (default: FusionConfig's, the deployed encoder's); smoke runs",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log_above_progress_bars()
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be at least 1")
    started = time.perf_counter()
    settings = Settings()
    dataset = load_movielens(args.dataset)
    # Only the validation split is kept: TRAIN's first 90% / last 10%. TEST is dropped
    # here and never scored.
    split = temporal_split(dataset.ratings).validation(VALIDATION_FRACTION)
    base = FusionConfig() if args.epochs is None else FusionConfig(epochs=args.epochs)
    results = run_ablation(
        settings,
        dataset.movies,
        split,
        steps=ladder(base),
        seed=args.seed,
        limit=args.limit,
        progress=not args.quiet,
    )
    meta = {
        "protocol": "T1",
        "scored": f"validation: last {VALIDATION_FRACTION:.0%} of TRAIN",
        "command": shlex.join(
            ["python", "-m", "infra.lab.ablation", *(sys.argv[1:] if argv is None else argv)]
        ),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "seed": args.seed,
        "k": K,
        "events_scored": results[0].run.summary["n_events"] if results else 0,
        "fusion_epochs": base.epochs,
        "updater": "rating-weighted mean",
        "data": describe_data(dataset, split),
        "deployed_item_encoder": deployed_version(settings),
        "settings": {
            "top_k": settings.top_k,
            "n_candidates": settings.n_candidates,
            "mmr_lambda": settings.mmr_lambda,
            "batch_size": settings.batch_size,
            "text_model": str(settings.text_model),
            "clip_weights": None if settings.clip_weights is None else str(settings.clip_weights),
        },
        "environment": {**environment(), "torch_threads": 1},
    }
    written = write_reports(args.out, results, meta)
    print(markdown_table(results))
    print(f"wall {meta['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
