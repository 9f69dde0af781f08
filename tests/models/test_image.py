"""The image modality: loading CLIP from local files only, encoding, and poster loading."""

from __future__ import annotations

import base64
import http.server
import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import Settings
from shared.exceptions import ConfigurationError
from shared.models.image import ImageEncoder, PosterError, load_image_encoder, load_poster
from tests.models.tiny_clip import (
    TINY_CLIP_CONFIG,
    TINY_CLIP_NAME,
    tiny_clip_settings,
    write_tiny_clip,
)


def random_image(seed: int, size: tuple[int, int] = (48, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> ImageEncoder:
    loaded = load_image_encoder(tiny_clip_settings(tmp_path_factory.mktemp("clip")))
    assert loaded is not None
    return loaded


# --- loading -------------------------------------------------------------------------


def test_no_weights_turns_the_modality_off_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="shared.models.image"):
        assert load_image_encoder(Settings(clip_weights=None)) is None
    assert "image modality off: CLIP_WEIGHTS not set" in caplog.text


def test_tiny_clip_loads_through_the_settings_path(encoder: ImageEncoder) -> None:
    assert encoder.dim == TINY_CLIP_CONFIG["embed_dim"]
    assert encoder.name.startswith(f"{TINY_CLIP_NAME}@")


def test_encode_is_normalised_float32_and_batch_equals_single(encoder: ImageEncoder) -> None:
    images = [random_image(seed) for seed in range(5)]
    batch = encoder.encode(images)
    assert batch.shape == (5, encoder.dim)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([encoder.encode([image]) for image in images])
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    # Different images must not collapse onto one vector (the model really ran).
    assert not np.allclose(batch[0], batch[1], atol=1e-3)


def test_same_weights_give_the_same_vectors_in_a_new_load(
    encoder: ImageEncoder, tmp_path: Path
) -> None:
    # write_tiny_clip seeds torch, so rewriting the model gives the same weights.
    again = load_image_encoder(tiny_clip_settings(tmp_path))
    assert again is not None
    images = [random_image(7), random_image(8)]
    np.testing.assert_allclose(encoder.encode(images), again.encode(images), atol=1e-6)
    assert again.name == encoder.name


def test_missing_weights_file_is_a_configuration_error(tmp_path: Path) -> None:
    settings = tiny_clip_settings(tmp_path, clip_weights=tmp_path / "nope.pt")
    with pytest.raises(ConfigurationError, match=r"CLIP_WEIGHTS=.*nope\.pt.* is not a file"):
        load_image_encoder(settings)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    other = {**TINY_CLIP_CONFIG, "embed_dim": 16}
    _, wrong_weights = write_tiny_clip(tmp_path / "other", name="reelstream-other", config=other)
    settings = tiny_clip_settings(tmp_path / "tiny", clip_weights=wrong_weights)
    with pytest.raises(ConfigurationError, match=r"cannot be loaded as CLIP_MODEL.*size mismatch"):
        load_image_encoder(settings)


def test_weights_are_never_unpickled(tmp_path: Path) -> None:
    # A checkpoint holding an arbitrary Python object must be refused, not executed.
    weights = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": ConfigurationError("x")}, weights)
    settings = tiny_clip_settings(tmp_path, clip_weights=weights)
    with pytest.raises(ConfigurationError, match=r"cannot be loaded.*Weights only load failed"):
        load_image_encoder(settings)


def test_config_file_must_be_named_after_the_architecture(tmp_path: Path) -> None:
    config, weights = write_tiny_clip(tmp_path, name="reelstream-named-otherwise")
    settings = Settings(
        clip_weights=weights, clip_model=TINY_CLIP_NAME + "-x", clip_model_config=config
    )
    with pytest.raises(ConfigurationError, match="registers architecture"):
        load_image_encoder(settings)


def test_unknown_architecture_is_a_configuration_error(tmp_path: Path) -> None:
    _, weights = write_tiny_clip(tmp_path)
    settings = Settings(clip_weights=weights, clip_model="no-such-architecture")
    with pytest.raises(ConfigurationError, match="not an open_clip architecture"):
        load_image_encoder(settings)


def test_hub_references_are_refused(tmp_path: Path) -> None:
    _, weights = write_tiny_clip(tmp_path)
    settings = Settings(clip_weights=weights, clip_model="hf-hub:laion/CLIP-ViT-B-32")
    with pytest.raises(ConfigurationError, match="plain architecture name"):
        load_image_encoder(settings)


# --- posters -------------------------------------------------------------------------


def test_poster_from_a_path_and_a_data_uri_are_the_same_image(tmp_path: Path) -> None:
    image = random_image(1)
    path = tmp_path / "poster.png"
    path.write_bytes(png_bytes(image))
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    from_path, from_uri = load_poster(str(path)), load_poster(uri)
    assert from_path.mode == "RGB"
    assert from_path.size == image.size
    assert np.array_equal(np.asarray(from_path), np.asarray(image))
    assert np.array_equal(np.asarray(from_uri), np.asarray(image))
    assert np.array_equal(np.asarray(load_poster(path.as_uri())), np.asarray(image))


def test_grayscale_and_alpha_posters_become_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("LA", (10, 12), (100, 50)).save(path)
    assert load_poster(str(path)).mode == "RGB"


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("", "empty"),
        ("data:text/plain;base64,aGVsbG8=", "data:image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64,aGVsbG8=", "not a readable image"),
        ("ftp://example.org/poster.jpg", "unsupported poster scheme"),
        ("/definitely/not/here.jpg", "does not exist"),
    ],
)
def test_bad_poster_references_raise_poster_error(ref: str, reason: str) -> None:
    with pytest.raises(PosterError, match=reason):
        load_poster(ref)


def test_oversized_poster_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(random_image(2)))
    with pytest.raises(PosterError, match="exceeds 100 bytes"):
        load_poster(str(path), max_bytes=100)


class _PosterHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        if self.path != "/poster.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def poster_server() -> Iterator[tuple[str, Image.Image]]:
    image = random_image(3)
    handler = type("Handler", (_PosterHandler,), {"body": png_bytes(image)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", image
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_poster_from_http(poster_server: tuple[str, Image.Image]) -> None:
    base, image = poster_server
    assert np.array_equal(np.asarray(load_poster(f"{base}/poster.png")), np.asarray(image))
    with pytest.raises(PosterError, match="HTTP 404"):
        load_poster(f"{base}/missing.png")
    with pytest.raises(PosterError, match="exceeds 100 bytes"):
        load_poster(f"{base}/poster.png", max_bytes=100)


def test_large_posters_are_downscaled_keeping_their_aspect(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    random_image(4, size=(1200, 1800)).save(path, quality=90)
    poster = load_poster(str(path))
    assert max(poster.size) == 512
    assert poster.size[1] / poster.size[0] == pytest.approx(1.5, abs=0.01)
    assert load_poster(str(path), max_side=100).size == (67, 100)
