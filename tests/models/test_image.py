"""The image modality: loading CLIP from local files only, encoding, and poster loading."""

from __future__ import annotations

import base64
import http.server
import io
import ipaddress
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import Settings
from shared.domain import Movie
from shared.exceptions import ConfigurationError
from shared.models.image import (
    MAX_POSTER_REDIRECTS,
    ImageEncoder,
    PosterError,
    is_public_address,
    load_image_encoder,
    load_poster,
    load_posters,
)
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
    from_path, from_uri = load_poster(str(path), poster_dir=tmp_path), load_poster(uri)
    assert from_path.mode == "RGB"
    assert from_path.size == image.size
    assert np.array_equal(np.asarray(from_path), np.asarray(image))
    assert np.array_equal(np.asarray(from_uri), np.asarray(image))
    from_file_uri = load_poster(path.as_uri(), poster_dir=tmp_path)
    assert np.array_equal(np.asarray(from_file_uri), np.asarray(image))


def test_grayscale_and_alpha_posters_become_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("LA", (10, 12), (100, 50)).save(path)
    assert load_poster(str(path), poster_dir=tmp_path).mode == "RGB"


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("", "empty"),
        ("data:text/plain;base64,aGVsbG8=", "data:image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64,aGVsbG8=", "not a readable image"),
        ("ftp://example.org/poster.jpg", "unsupported poster scheme"),
        ("gopher://127.0.0.1:70/", "unsupported poster scheme"),
        ("/definitely/not/here.jpg", "REELSTREAM_POSTER_DIR is not set"),
    ],
)
def test_bad_poster_references_raise_poster_error(ref: str, reason: str) -> None:
    with pytest.raises(PosterError, match=reason):
        load_poster(ref)


def test_oversized_poster_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(random_image(2)))
    with pytest.raises(PosterError, match="exceeds 100 bytes"):
        load_poster(str(path), poster_dir=tmp_path, max_bytes=100)


def test_an_inline_poster_over_the_size_limit_is_refused() -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(random_image(2))).decode()
    with pytest.raises(PosterError, match="inline poster exceeds 100 bytes"):
        load_poster(uri, max_bytes=100)


# --- local poster files: only inside REELSTREAM_POSTER_DIR ------------------------------


@pytest.fixture
def poster_dir(tmp_path: Path) -> Path:
    """``tmp_path/posters`` holding ``poster.png`` and ``sub/nested.png``; outside it,
    ``tmp_path/secret.png`` and ``tmp_path/posters-evil/poster.png`` (valid images)."""
    folder = tmp_path / "posters"
    (folder / "sub").mkdir(parents=True)
    for path in (
        folder / "poster.png",
        folder / "sub" / "nested.png",
        tmp_path / "secret.png",
        tmp_path / "posters-evil" / "poster.png",
    ):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(random_image(5)))
    return folder


def test_local_posters_are_refused_when_no_poster_dir_is_set(poster_dir: Path) -> None:
    # Before: any file the service could read (as root in a container) was a poster.
    with pytest.raises(PosterError, match="REELSTREAM_POSTER_DIR is not set"):
        load_poster(str(poster_dir / "poster.png"))
    with pytest.raises(PosterError, match="REELSTREAM_POSTER_DIR is not set"):
        load_poster((poster_dir / "poster.png").as_uri())


@pytest.mark.parametrize(
    "ref",
    [
        "{dir}/../secret.png",
        "../secret.png",
        "sub/../../secret.png",
        "{tmp}/secret.png",
        "file://{tmp}/secret.png",
        "{tmp}/posters-evil/poster.png",  # a sibling whose name starts like the folder's
        "/etc/passwd",
        "/proc/self/environ",
    ],
)
def test_a_file_outside_the_poster_dir_is_refused(poster_dir: Path, ref: str) -> None:
    ref = ref.format(dir=poster_dir, tmp=poster_dir.parent)
    with pytest.raises(PosterError, match="outside REELSTREAM_POSTER_DIR"):
        load_poster(ref, poster_dir=poster_dir)


def test_a_symlink_escaping_the_poster_dir_is_refused(poster_dir: Path) -> None:
    (poster_dir / "link.png").symlink_to(poster_dir.parent / "secret.png")
    (poster_dir / "linked-dir").symlink_to(poster_dir.parent, target_is_directory=True)
    (poster_dir / "root").symlink_to("/", target_is_directory=True)
    for ref in ("link.png", "linked-dir/secret.png", f"{poster_dir}/root/etc/passwd"):
        with pytest.raises(PosterError, match="outside REELSTREAM_POSTER_DIR"):
            load_poster(ref, poster_dir=poster_dir)


@pytest.mark.parametrize(
    "ref",
    [
        "{dir}/poster.png",
        "poster.png",  # relative to the folder
        "sub/nested.png",
        "sub/../poster.png",
        "{dir}/sub/../sub/nested.png",
        "file://{dir}/sub/nested.png",
        "inner-link.png",  # a symlink that stays inside
    ],
)
def test_a_file_inside_the_poster_dir_is_accepted(poster_dir: Path, ref: str) -> None:
    (poster_dir / "inner-link.png").symlink_to(poster_dir / "sub" / "nested.png")
    expected = np.asarray(random_image(5))
    image = load_poster(ref.format(dir=poster_dir), poster_dir=poster_dir)
    assert np.array_equal(np.asarray(image), expected)


def test_a_poster_dir_reached_through_a_symlink_still_works(poster_dir: Path) -> None:
    alias = poster_dir.parent / "alias"
    alias.symlink_to(poster_dir, target_is_directory=True)
    assert load_poster(str(poster_dir / "poster.png"), poster_dir=alias).size == (48, 64)
    assert load_poster(str(alias / "poster.png"), poster_dir=poster_dir).size == (48, 64)


def test_a_missing_file_inside_the_poster_dir_says_so(poster_dir: Path) -> None:
    with pytest.raises(PosterError, match="does not exist"):
        load_poster("nope.png", poster_dir=poster_dir)
    with pytest.raises(PosterError, match="does not exist"):
        load_poster("sub", poster_dir=poster_dir)  # a folder is no poster


def test_the_tiny_clip_encoder_takes_the_poster_dir_from_settings_and_masks_refusals(
    poster_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clip = load_image_encoder(tiny_clip_settings(tmp_path / "clip", poster_dir=poster_dir))
    assert clip is not None and clip.poster_dir == poster_dir
    movies = [
        Movie(movie_id="1", title="Inside", poster="poster.png"),
        Movie(movie_id="2", title="Outside", poster=str(tmp_path / "secret.png")),
        Movie(movie_id="3", title="Internal", poster="http://127.0.0.1:9/poster.png"),
        Movie(movie_id="4", title="None"),
    ]
    with caplog.at_level(logging.WARNING, logger="shared.models.image"):
        images = load_posters(movies, clip.poster_dir)
    assert images[0] is not None and images[1:] == [None, None, None]
    assert clip.encode([images[0]]).shape == (1, clip.dim)
    assert "movie_id=2 reason=poster file" in caplog.text and "outside" in caplog.text
    assert "movie_id=3 reason=poster host '127.0.0.1' is not public" in caplog.text
    # Settings without the folder refuse every local poster.
    without = load_image_encoder(tiny_clip_settings(tmp_path / "clip2"))
    assert without is not None and without.poster_dir is None
    assert load_posters(movies[:1], without.poster_dir) == [None]


# --- posters over HTTP: public addresses only ----------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2a00:1450:4001:82b::200e",
        "::ffff:8.8.8.8",  # IPv4-mapped public
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    ],
)
def test_public_addresses_are_public(address: str) -> None:
    assert is_public_address(address)
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "10.0.0.1",
        "172.16.5.4",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared (CGNAT)
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",  # multicast
        "239.255.255.250",
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "198.18.0.1",  # benchmarking
        "::1",
        "::",
        "fe80::1",
        "fe80::1%1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "2001:db8::1",
        "fec0::1",  # site-local
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "2001::1",  # Teredo
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0.0.0.0",
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_internal_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(address)


class _PosterHandler(http.server.BaseHTTPRequestHandler):
    """``/poster.png``; ``/redirect?to=URL`` (302); ``/loop`` (redirects to itself);
    ``/drip`` (a header line every 0.1 s, never done); anything else 404. Every request
    is recorded in ``seen`` as (path, Host header)."""

    body = b""
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Host")))
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(url.query)["to"][0])
            self.end_headers()
        elif url.path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif url.path == "/drip":
            self.send_response(200)
            self.flush_headers()
            try:
                for i in range(200):
                    self.wfile.write(f"X-Drip-{i}: x\r\n".encode())
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif url.path == "/poster.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        else:
            self.send_error(404)

    def log_message(self, *_args: object) -> None:
        pass


@dataclass
class PosterServer:
    base: str
    port: int
    image: Image.Image
    seen: list[tuple[str, str | None]]


LOOPBACK = [ipaddress.ip_network("127.0.0.1/32")]


@pytest.fixture
def poster_server() -> Iterator[PosterServer]:
    image = random_image(3)
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_PosterHandler,), {"body": png_bytes(image), "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = int(server.server_address[1])
    try:
        yield PosterServer(f"http://127.0.0.1:{port}", port, image, seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433"])
def test_a_poster_on_a_local_server_is_refused_before_any_request(
    poster_server: PosterServer, host: str
) -> None:
    # Before: any URL was fetched, internal services and cloud metadata included.
    with pytest.raises(PosterError, match="is not public: it resolves to"):
        load_poster(f"http://{host}:{poster_server.port}/poster.png")
    assert poster_server.seen == []


def test_poster_from_a_trusted_network(poster_server: PosterServer) -> None:
    base = poster_server.base
    image = load_poster(f"{base}/poster.png", trusted_networks=LOOPBACK)
    assert np.array_equal(np.asarray(image), np.asarray(poster_server.image))
    with pytest.raises(PosterError, match="HTTP 404"):
        load_poster(f"{base}/missing.png", trusted_networks=LOOPBACK)
    with pytest.raises(PosterError, match="exceeds 100 bytes"):
        load_poster(f"{base}/poster.png", max_bytes=100, trusted_networks=LOOPBACK)


def test_the_connection_goes_to_the_checked_address_from_one_lookup(
    poster_server: PosterServer,
) -> None:
    lookups: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        return ["127.0.0.1"]

    # posters.test exists in no DNS: only the checked answer can have been connected to.
    url = f"http://posters.test:{poster_server.port}/poster.png"
    image = load_poster(url, resolve=resolve, trusted_networks=LOOPBACK)
    assert np.array_equal(np.asarray(image), np.asarray(poster_server.image))
    assert lookups == [("posters.test", poster_server.port)]
    assert poster_server.seen == [("/poster.png", f"posters.test:{poster_server.port}")]


def test_a_name_with_any_internal_address_is_refused() -> None:
    def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.1"]

    with pytest.raises(PosterError, match=re.escape("'posters.test' is not public: it resolves")):
        load_poster("https://posters.test/poster.png", resolve=resolve)


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("http://10.0.0.1/poster.png", "resolves to 10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "resolves to 169.254.169.254"),
        ("http://[::1]:{port}/poster.png", "resolves to ::1"),
        ("http://[::ffff:10.1.2.3]/poster.png", "resolves to ::ffff:a01:203"),
        ("http://0.0.0.0:{port}/poster.png", "resolves to 0.0.0.0"),
        ("file:///etc/passwd", "unsupported scheme 'file'"),
    ],
)
def test_a_redirect_to_an_internal_address_is_refused(
    poster_server: PosterServer, to: str, reason: str
) -> None:
    target = urllib.parse.quote(to.format(port=poster_server.port), safe="")
    with pytest.raises(PosterError, match=re.escape(reason)):
        load_poster(f"{poster_server.base}/redirect?to={target}", trusted_networks=LOOPBACK)
    assert [path for path, _ in poster_server.seen] == [f"/redirect?to={target}"]


def test_redirects_are_followed_each_hop_checked_and_at_most_a_few(
    poster_server: PosterServer,
) -> None:
    base = poster_server.base
    hop = urllib.parse.quote(f"{base}/redirect?to=%2Fposter.png", safe="")
    image = load_poster(f"{base}/redirect?to={hop}", trusted_networks=LOOPBACK)
    assert np.array_equal(np.asarray(image), np.asarray(poster_server.image))
    assert [path for path, _ in poster_server.seen][-1] == "/poster.png"
    with pytest.raises(PosterError, match=f"redirected more than {MAX_POSTER_REDIRECTS} times"):
        load_poster(f"{base}/loop", trusted_networks=LOOPBACK)


def test_a_server_dripping_bytes_is_cut_at_the_time_limit(poster_server: PosterServer) -> None:
    started = time.monotonic()
    with pytest.raises(PosterError, match="longer than its time limit"):
        load_poster(f"{poster_server.base}/drip", timeout_s=0.5, trusted_networks=LOOPBACK)
    assert time.monotonic() - started < 3.0


def test_large_posters_are_downscaled_keeping_their_aspect(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    random_image(4, size=(1200, 1800)).save(path, quality=90)
    poster = load_poster(str(path), poster_dir=tmp_path)
    assert max(poster.size) == 512
    assert poster.size[1] / poster.size[0] == pytest.approx(1.5, abs=0.01)
    assert load_poster(str(path), poster_dir=tmp_path, max_side=100).size == (67, 100)
