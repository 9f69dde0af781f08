"""``make ablation`` (``infra.lab.ablation``): the encoder ladder, its reports and the split it
scores, on a small MovieLens-format folder with short fusion trainings."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from infra.lab.ablation import SKIPPED, ladder, main, run_ablation
from infra.lab.evaluation.split import temporal_split
from infra.lab.training.fusion import FusionConfig, train_fusion
from shared.config import Settings
from shared.data.movielens import load_movielens
from shared.models.text import TextEncoder
from tests.data.ml100k_files import write_recbole

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
N_MOVIES = 30
N_USERS = 20
PER_USER = 10
SMALL = FusionConfig(
    epochs=2, batch_size=32, triplet_batch=16, hidden_dim=32, out_dim=16, people_buckets=256
)
"""A fusion config small enough to train in a second or two on the dataset below."""


def write_dataset(folder: Path) -> Path:
    """30 movies of 6 genres; 20 users, each rating 10 movies mostly of one genre, in time
    order (200 ratings: TRAIN 160, of which validation trains on 144 and scores 16)."""
    items = [
        (str(i), f"{GENRES[i % 6]} picture {i}", str(1970 + i), f"{GENRES[i % 6]} Drama")
        for i in range(1, N_MOVIES + 1)
    ]
    ratings = []
    for u in range(N_USERS):
        liked = [i for i in range(1, N_MOVIES + 1) if i % 6 == u % 6]
        others = [i for i in range(1, N_MOVIES + 1) if i % 6 != u % 6]
        chosen = liked + others[u % 7 : u % 7 + PER_USER - len(liked)]
        for j, movie in enumerate(chosen):
            stars = 5 if movie in liked else 1 + (u + j) % 3
            ratings.append((str(u + 1), str(movie), str(stars), str(880_000_000 + u * 100 + j)))
    return write_recbole(folder, ratings=ratings, items=items, knowledge_graph=False)


def test_ladder_varies_only_the_objective_and_metadata_switches() -> None:
    steps = ladder(SMALL)
    assert [s.name for s in steps] == [
        "content-knn",
        "fusion-triplet",
        "fusion-interaction-text",
        "fusion-interaction",
        "fusion-all",
    ]
    assert steps[0].fusion is None
    switches = [
        (s.fusion.use_metadata, s.fusion.use_triplet, s.fusion.use_interaction)
        for s in steps[1:]
        if s.fusion is not None
    ]
    assert switches == [
        (True, True, False),
        (False, False, True),
        (True, False, True),
        (True, True, True),
    ]
    for step in steps[1:]:
        assert step.fusion is not None
        assert (
            dataclasses.replace(
                step.fusion, use_metadata=True, use_triplet=True, use_interaction=True
            )
            == SMALL
        )
    # The last step of the default ladder is the deployed encoder's config.
    assert ladder()[-1].fusion == FusionConfig()
    assert "content-knn-text" in SKIPPED


def test_ablation_scores_every_step_on_the_validation_split_only(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "ml-100k")
    out = tmp_path / "reports"
    assert main(["--dataset", str(dataset), "--out", str(out), "--epochs", "2", "--quiet"]) == 0

    document = json.loads((out / "ablation.json").read_text())
    names = [s.name for s in ladder()]
    assert [row["step"] for row in document["steps"]] == names
    # Validation: trained on the first 90% of TRAIN (144), scored on its last 10% (16);
    # TEST (the last 40 ratings) is never scored.
    assert document["data"]["train"] == 144
    assert document["data"]["test"] == 16
    assert document["events_scored"] == 16
    assert document["fusion_epochs"] == 2
    assert document["settings"]["mmr_lambda"] == Settings().mmr_lambda
    for row in document["steps"]:
        assert row["n_events"] == 16, row["step"]
        for value in (row["segments"]["all"]["ndcg"], row["segments"]["all"]["hr"]):
            assert 0.0 <= value <= 1.0, row["step"]
        assert 0.0 < row["coverage"] <= 1.0
        assert math.isfinite(row["ild"])
        assert -1.0 <= row["mean_cosine"] <= row["nn_cosine"] <= 1.0 + 1e-6
        if row["step"] == "content-knn":
            assert row["fusion_config"] is None and row["history"] is None
        else:
            assert row["fusion_config"]["epochs"] == 2
            assert len(row["history"]["train_loss"]) == 2
            assert row["encoder_version"].startswith("fusion-v1-")

    markdown = (out / "ablation.md").read_text()
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + len(names)  # the header, then one row per step
    assert f"MMR lambda {Settings().mmr_lambda:g}" in markdown
    assert "content-knn-text" in markdown


def test_the_fusion_steps_are_trained_as_infra_train_trains_the_deployed_encoder(
    tmp_path: Path,
) -> None:
    """Same data, seed and thread count as ``infra.lab.train``: the same weights (version)."""
    dataset = load_movielens(write_dataset(tmp_path / "ml-100k"))
    split = temporal_split(dataset.ratings).validation(0.1)
    text = TextEncoder()
    step = ladder(SMALL)[-1]
    (result,) = run_ablation(
        Settings(n_candidates=20),
        dataset.movies,
        split,
        steps=[step],
        text_encoder=text,
        limit=5,
        progress=False,
    )
    assert result.run.summary["n_events"] == 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, config, _ = train_fusion(
            dataset.movies, split.train, text, None, config=SMALL, seed=0, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    assert result.encoder_version == config["version"]
