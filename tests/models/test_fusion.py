"""The trained fusion item encoder: contract, masking, posters, training, checkpoints."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import Settings
from shared.events import MoviePublished, People, RatingSubmitted
from shared.exceptions import ConfigurationError
from shared.models.checkpoint import CONFIG_FILE
from shared.models.fusion import (
    RATED_KEY,
    FusionConfig,
    FusionItemEncoder,
    FusionNet,
    encode_catalogue,
    load_fusion_encoder,
    save_fusion,
    train_fusion,
)
from shared.models.image import ImageEncoder, load_image_encoder
from shared.models.item_encoder import ItemEncoder
from shared.models.text import TextEncoder
from tests.models.tiny_clip import TINY_CLIP_CONFIG, tiny_clip_settings, write_tiny_clip

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]
N_MOVIES = 40
SMALL = FusionConfig(
    epochs=8,
    batch_size=64,
    triplet_batch=32,
    hidden_dim=64,
    out_dim=32,
    people_buckets=512,
    lr=1e-2,
)


def make_movie(i: int, **fields: object) -> MoviePublished:
    values: dict[str, object] = {
        "movie_id": str(i),
        "title": f"Movie number {i}",
        "year": 1950 + i % 50,
        "genres": [GENRES[i % len(GENRES)], GENRES[(i // 5) % len(GENRES)]],
        "people": People(
            directors=[f"director {i % 7}"],
            cast=[f"actor {i % 11}", f"actor {(i + 3) % 13}", f"actor {i}"],
            writers=[f"writer {i % 4}"],
        ),
    }
    values.update(fields)
    return MoviePublished.model_validate(values)


MOVIES = [make_movie(i) for i in range(N_MOVIES)]
GROUPS = [list(range(0, N_MOVIES, 2)), list(range(1, N_MOVIES, 2))]
"""Users of group g rate only the movies of GROUPS[g]: even and odd ids, which content
(genres, people) does not tell apart, so only the interaction objective can."""


def make_ratings(n_users: int = 24, per_user: int = 12, seed: int = 0) -> list[RatingSubmitted]:
    rng = np.random.default_rng(seed)
    start = datetime(1998, 1, 1, tzinfo=UTC)
    ratings = []
    for user in range(n_users):
        movies = rng.choice(GROUPS[user % 2], size=per_user, replace=False)
        for step, movie in enumerate(movies):
            ratings.append(
                RatingSubmitted(
                    user_id=str(user),
                    movie_id=str(movie),
                    rating=float(rng.integers(3, 6)),
                    occurred_at=start + timedelta(minutes=user * 100 + step),
                )
            )
    return ratings


RATINGS = make_ratings()


def vectors(encoder: ItemEncoder, movies: list[MoviePublished]) -> np.ndarray:
    return np.stack([item.vector for item in encoder.encode(movies)])


def co_rated_gap(matrix: np.ndarray) -> float:
    """Mean cosine of same-group pairs minus that of cross-group pairs."""
    sims = matrix @ matrix.T
    same = [sims[a, b] for g in GROUPS for a, b in combinations(g, 2)]
    cross = [sims[a, b] for a in GROUPS[0] for b in GROUPS[1]]
    return float(np.mean(same) - np.mean(cross))


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def trained(text: TextEncoder) -> tuple[FusionNet, dict, dict]:
    return train_fusion(MOVIES, RATINGS, text, config=SMALL, seed=0, progress=False)


@pytest.fixture(scope="module")
def encoder(trained: tuple[FusionNet, dict, dict], text: TextEncoder) -> FusionItemEncoder:
    net, config, _ = trained
    return FusionItemEncoder(net, config, text)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip")


@pytest.fixture(scope="module")
def image(clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageEncoder:
    # Local posters must be in REELSTREAM_POSTER_DIR: the tests' temporary folders.
    settings = tiny_clip_settings(clip_dir, poster_dir=tmp_path_factory.getbasetemp())
    loaded = load_image_encoder(settings)
    assert loaded is not None
    return loaded


@pytest.fixture(scope="module")
def posters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("posters")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = folder / f"poster{i}.png"
        pixels = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


def test_vectors_are_normalised_of_the_encoder_dim_and_batch_equals_single(
    encoder: FusionItemEncoder,
) -> None:
    assert isinstance(encoder, ItemEncoder)
    assert encoder.dim == SMALL.out_dim
    assert encoder.modalities_enabled == ["text", "metadata"]
    assert encoder.model_version.startswith("fusion-v1-")
    batch = vectors(encoder, MOVIES[:6])
    assert batch.dtype == np.float32
    assert batch.shape == (6, SMALL.out_dim)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    single = np.stack([vectors(encoder, [m])[0] for m in MOVIES[:6]])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    assert encoder.encode([]) == []


def test_a_movie_without_metadata_is_embedded_from_its_text_alone(
    encoder: FusionItemEncoder,
) -> None:
    bare = MoviePublished(movie_id="900", title="A film with nothing else known")
    people_only = MoviePublished(
        movie_id="901", title="Another film", people=People(directors=["director 1"])
    )
    items = encoder.encode([bare, people_only, MOVIES[0]])
    assert [i.modalities for i in items] == [["text"], ["text", "metadata"], ["text", "metadata"]]
    for item in items:
        assert np.isfinite(item.vector).all()
        assert np.linalg.norm(item.vector) == pytest.approx(1.0, abs=1e-5)
    # The metadata branch changes the vector: it is used, not ignored.
    with_meta = encoder.encode([make_movie(0)])[0].vector
    without = encoder.encode([make_movie(0, genres=[], year=None, people=People())])[0].vector
    assert not np.allclose(with_meta, without, atol=1e-4)


def test_an_unseen_movie_gets_a_vector_from_its_content(encoder: FusionItemEncoder) -> None:
    unseen = make_movie(
        777,
        title="A brand new release",
        people=People(directors=["someone new"], cast=["a new face"]),
    )
    vector = encoder.encode([unseen])[0].vector
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    catalogue = vectors(encoder, MOVIES)
    assert (catalogue @ vector).max() < 1.0 - 1e-4


def test_the_encoder_says_which_movies_it_learned_from_ratings(
    trained: tuple[FusionNet, dict, dict],
    encoder: FusionItemEncoder,
    text: TextEncoder,
    tmp_path: Path,
) -> None:
    net, config, _ = trained
    some = [r for r in RATINGS if int(r.movie_id) < 30]  # movies 30-39 left unrated
    rated = sorted({r.movie_id for r in some})
    half, half_config, _ = train_fusion(MOVIES, some, text, config=SMALL, seed=0, progress=False)
    assert half_config[RATED_KEY] == rated and len(rated) == 30
    half_encoder = FusionItemEncoder(half, half_config, text)
    flags = [item.rated_in_training for item in half_encoder.encode(MOVIES)]
    assert flags == [m.movie_id in rated for m in MOVIES]
    assert not encoder.encode([make_movie(777)])[0].rated_in_training

    # The list is data, not weights: a checkpoint without it loads under the same
    # version, and then counts every movie as learned, so no vector is ever moved.
    directory = save_fusion(tmp_path / "fusion", net, config)
    raw = json.loads((directory / CONFIG_FILE).read_text())
    del raw[RATED_KEY]
    (directory / CONFIG_FILE).write_text(json.dumps(raw))
    older = load_fusion_encoder(directory, text)
    assert older.model_version == encoder.model_version
    assert older.encode([make_movie(777)])[0].rated_in_training


def test_training_reduces_the_loss_and_logs_the_spread(
    trained: tuple[FusionNet, dict, dict],
) -> None:
    _, config, history = trained
    losses = history["train_loss"]
    assert len(losses) == SMALL.epochs
    assert losses[-1] < losses[0]
    assert history["interaction_loss"][-1] < history["interaction_loss"][0]
    assert len(history["nn_cosine"]) == len(history["mean_cosine"]) == SMALL.epochs
    assert -1.0 <= history["mean_cosine"][-1] <= history["nn_cosine"][-1] <= 1.0
    assert history["val_loss"] == []
    assert config["kind"] == "fusion-item-encoder"
    assert config["training"]["seed"] == 0
    assert config["training"]["config"]["epochs"] == SMALL.epochs


def test_training_is_reproducible_with_a_seed(
    trained: tuple[FusionNet, dict, dict], text: TextEncoder
) -> None:
    net, config, history = trained
    again, config_again, history_again = train_fusion(
        MOVIES, RATINGS, text, config=SMALL, seed=0, progress=False
    )
    assert config_again["version"] == config["version"]
    assert history_again["train_loss"] == history["train_loss"]
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    _, other, _ = train_fusion(MOVIES, RATINGS, text, config=SMALL, seed=1, progress=False)
    assert other["version"] != config["version"]


INTERACTION_ONLY = FusionConfig(
    use_triplet=False, epochs=8, batch_size=32, hidden_dim=64, out_dim=32, people_buckets=512
)
"""A small encoder trained on the interaction objective alone."""


def test_the_interaction_objective_pulls_co_rated_movies_together(
    text: TextEncoder, trained: tuple[FusionNet, dict, dict]
) -> None:
    _, config, _ = trained
    net, config, _ = train_fusion(
        MOVIES, RATINGS, text, config=INTERACTION_ONLY, seed=0, progress=False
    )
    torch.manual_seed(0)
    # The same architecture and input standardisation, untrained.
    fresh = FusionNet(text_dim=text.dim, hidden_dim=64, out_dim=32, people_buckets=512)
    fresh.load_state_dict(
        {**fresh.state_dict(), "text_shift": net.text_shift, "text_scale": net.text_scale}
    )
    before = co_rated_gap(vectors(FusionItemEncoder(fresh, config, text), MOVIES))
    after = co_rated_gap(vectors(FusionItemEncoder(net, config, text), MOVIES))
    assert after > before + 0.1, (before, after)


def test_a_movie_nobody_rated_is_not_pushed_away_from_the_rated_ones(text: TextEncoder) -> None:
    """The interaction softmax draws its negatives from the rated movies only: with the
    whole catalogue as negatives, movies nobody rated end up far from every context."""
    unrated = {m.movie_id for m in MOVIES[-8:]}
    ratings = [r for r in RATINGS if r.movie_id not in unrated]

    def gap(rated_only: bool) -> float:
        config = dataclasses.replace(INTERACTION_ONLY, rated_negatives_only=rated_only)
        net, record, _ = train_fusion(MOVIES, ratings, text, config=config, progress=False)
        assert record["training"]["config"]["rated_negatives_only"] is rated_only
        matrix = vectors(FusionItemEncoder(net, record, text), MOVIES)
        is_new = np.array([m.movie_id in unrated for m in MOVIES])
        centre = matrix[~is_new].mean(axis=0)
        # How much closer the rated movies are to their centre than the unrated ones.
        return float((matrix[~is_new] @ centre).mean() - (matrix[is_new] @ centre).mean())

    assert gap(rated_only=True) < gap(rated_only=False) - 0.05


def test_validation_loss_is_recorded_when_ratings_are_held_out(text: TextEncoder) -> None:
    config = FusionConfig(
        use_triplet=False,
        epochs=2,
        batch_size=64,
        hidden_dim=32,
        out_dim=16,
        people_buckets=64,
        val_fraction=0.2,
    )
    _, record, history = train_fusion(MOVIES, RATINGS, text, config=config, progress=False)
    assert len(history["val_loss"]) == 2
    assert all(np.isfinite(history["val_loss"]))
    assert record["training"]["n_examples"] < len(RATINGS)


def test_save_and_load_give_the_same_vectors_and_version(
    trained: tuple[FusionNet, dict, dict],
    encoder: FusionItemEncoder,
    text: TextEncoder,
    tmp_path: Path,
) -> None:
    net, config, _ = trained
    save_fusion(tmp_path / "fusion", net, config)
    loaded = load_fusion_encoder(tmp_path / "fusion", text)
    assert loaded.model_version == encoder.model_version
    assert loaded.dim == encoder.dim
    np.testing.assert_array_equal(vectors(loaded, MOVIES[:5]), vectors(encoder, MOVIES[:5]))
    ids, matrix = encode_catalogue(loaded, MOVIES[:7])
    assert ids == [m.movie_id for m in MOVIES[:7]]
    np.testing.assert_array_equal(matrix, vectors(encoder, MOVIES[:7]))


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("text_model", "another-text-model", "text model"),
        ("text_dim", 768, "text model"),
        ("out_dim", 64, "does not fit"),
        ("version", "fusion-v1-00000000", "does not match its weights"),
        ("kind", "user-updater", "not a 'fusion-item-encoder'"),
    ],
)
def test_a_checkpoint_that_does_not_match_is_refused(
    trained: tuple[FusionNet, dict, dict],
    text: TextEncoder,
    tmp_path: Path,
    key: str,
    value: object,
    reason: str,
) -> None:
    net, config, _ = trained
    directory = save_fusion(tmp_path / "fusion", net, config)
    raw = json.loads((directory / CONFIG_FILE).read_text())
    raw[key] = value
    (directory / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ConfigurationError, match=reason):
        load_fusion_encoder(directory, text)


def test_posters_feed_the_image_modality_and_bad_ones_are_masked(
    text: TextEncoder, image: ImageEncoder, posters: list[Path], tmp_path: Path
) -> None:
    movies = [
        make_movie(i, poster=str(posters[i % len(posters)])) if i % 2 == 0 else make_movie(i)
        for i in range(N_MOVIES)
    ]
    net, config, _ = train_fusion(
        movies, RATINGS, text, image, config=SMALL, seed=0, progress=False
    )
    assert config["image_dim"] == image.dim
    encoder = FusionItemEncoder(net, config, text, image)
    assert encoder.modalities_enabled == ["text", "image", "metadata"]
    broken = make_movie(5, poster=str(tmp_path / "missing.png"))
    items = encoder.encode([movies[0], movies[1], broken])
    assert [i.modalities for i in items] == [
        ["text", "image", "metadata"],
        ["text", "metadata"],
        ["text", "metadata"],
    ]
    # The poster is used: the same movie without it gets another vector.
    assert not np.allclose(items[0].vector, encoder.encode([make_movie(0)])[0].vector, atol=1e-4)
    batch = vectors(encoder, movies[:4])
    single = np.stack([vectors(encoder, [m])[0] for m in movies[:4]])
    np.testing.assert_allclose(batch, single, atol=1e-5)

    # Without an image encoder the image of every movie is masked, not zero-filled.
    masked = FusionItemEncoder(net, config, text)
    assert masked.modalities_enabled == ["text", "metadata"]
    assert masked.encode([movies[0]])[0].modalities == ["text", "metadata"]

    # A checkpoint trained on one CLIP is refused with another.
    save_fusion(tmp_path / "fusion", net, config)
    config_path, weights = write_tiny_clip(
        tmp_path / "other-clip",
        name="reelstream-other-clip",
        config={**TINY_CLIP_CONFIG, "embed_dim": 16},
    )
    other = load_image_encoder(
        Settings(
            clip_weights=weights,
            clip_model="reelstream-other-clip",
            clip_model_config=config_path,
            device="cpu",
        )
    )
    assert other is not None
    with pytest.raises(ConfigurationError, match="image model"):
        load_fusion_encoder(tmp_path / "fusion", text, other)


def test_a_config_with_no_objective_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        FusionConfig(use_triplet=False, use_interaction=False)
    with pytest.raises(ConfigurationError):
        FusionConfig(temperature=0.0)
