"""Protocol T1 results as a Markdown table, JSON and PNG plots under ``reports/``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from infra.lab.evaluation.harness import ModelRun
from infra.lab.evaluation.metrics import rolling_mean

log = logging.getLogger(__name__)

ROLLING_WINDOW = 1000
"""Test events per point of the rolling NDCG@10 plot."""

SEGMENTS = (
    ("all", "all"),
    ("liked", "liked (>=4)"),
    ("cold_users", "cold users"),
    ("cold_items", "cold items"),
)


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(runs: Sequence[ModelRun]) -> str:
    """One row per (variant, model): HR@k and NDCG@k per segment, ILD, coverage,
    RMSE/MAE and wall time; the segments' event counts go in a line under the table."""
    if not runs:
        return "(no runs)\n"
    k = runs[0].summary["k"]
    head = ["variant", "model"]
    for _, label in SEGMENTS:
        head += [f"HR@{k} {label}", f"NDCG@{k} {label}"]
    head += [f"ILD@{k}", "coverage", "RMSE", "MAE", "fit s", "test s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        s = run.summary
        cells = [run.variant, f"`{run.name}`"]
        for key, _ in SEGMENTS:
            seg = s["segments"][key]
            cells += [_num(seg["hr"]), _num(seg["ndcg"])]
        cells += [
            _num(s["ild"]),
            _num(s["coverage"], 3),
            _num(s["rmse"]),
            _num(s["mae"]),
            f"{run.fit_s:.1f}",
            f"{run.test_s:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    counts = runs[0].summary["segments"]
    lines.append("")
    lines.append(
        "Test events: "
        + ", ".join(f"{label} {counts[key]['n']:,}" for key, label in SEGMENTS)
        + "."
    )
    return "\n".join(lines) + "\n"


def sweep_table(points: Sequence[dict[str, Any]]) -> str:
    """The MMR lambda trade-off as a Markdown table."""
    lines = ["| MMR lambda | HR@10 | NDCG@10 | ILD@10 | coverage |", "|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['mmr_lambda']:.1f} | {_num(p['hr'])} | {_num(p['ndcg'])} | "
            f"{_num(p['ild'])} | {_num(p['coverage'], 3)} |"
        )
    return "\n".join(lines) + "\n"


def plot_rolling_ndcg(runs: Sequence[ModelRun], path: Path, window: int = ROLLING_WINDOW) -> None:
    """NDCG@10 over the test stream, trailing mean over ``window`` events, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for run in runs:
        series = rolling_mean(run.ndcg_series, window)
        # Points before the first full window average a handful of events: noise.
        first = min(window, len(series)) - 1
        x = np.arange(first + 1, len(series) + 1)
        ax.plot(x, series[first:], label=f"{run.name}", linewidth=1.4)
    ax.set_xlabel("test event (time order)")
    ax.set_ylabel(f"NDCG@10, trailing mean of {window} events")
    variant = runs[0].variant if runs else ""
    ax.set_title(f"Protocol T1 on MovieLens-100K ({variant}): NDCG@10 over the test stream")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_mmr_tradeoff(
    points: Sequence[dict[str, Any]], path: Path, deployed: float, model: str = "content-knn"
) -> None:
    """NDCG@10 against ILD@10, one point per MMR lambda, the deployed lambda marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ild = [p["ild"] or 0.0 for p in points]
    ndcg = [p["ndcg"] or 0.0 for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    ax.plot(ild, ndcg, marker="o", linewidth=1.2)
    for p, x, y in zip(points, ild, ndcg, strict=True):
        mark = " (deployed)" if abs(p["mmr_lambda"] - deployed) < 1e-9 else ""
        ax.annotate(
            f"λ={p['mmr_lambda']:.1f}{mark}",
            (x, y),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("ILD@10 (genre diversity of the list)")
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"MMR lambda: relevance against diversity ({model}, all-items)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Pretty, key-sorted JSON (numpy scalars converted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        orjson.dumps(
            document,
            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY,
        )
        + b"\n"
    )
    log.info("wrote %s", path)
