"""Image modality: an open_clip embedding of a movie's poster.

The modality is optional. Without ``CLIP_WEIGHTS`` it is off and movies are embedded
from text and metadata only. With it, the weights are read from that local file only
(nothing is ever downloaded). A poster that cannot be loaded never fails its movie: the
caller masks the image modality for that movie and logs why.

Posters come from the wire, so they are read defensively: a local file only inside
``REELSTREAM_POSTER_DIR`` (none when it is unset), a URL only over http(s) from public
addresses (each redirect checked again, the address connected to being the one
checked), and ``data:`` URIs; all within a size and a time limit.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from PIL import Image

from shared.config import Settings
from shared.domain import Movie
from shared.exceptions import ConfigurationError, NumericalError, ReelstreamError
from shared.models.device import resolve_device
from shared.types import Matrix

log = logging.getLogger(__name__)

POSTER_TIMEOUT_S = 5.0
"""Longest time (seconds) spent fetching one poster over HTTP, redirects included (the
host name lookups excepted: the system resolver bounds those)."""

MAX_POSTER_REDIRECTS = 3
"""Most HTTP redirects followed for one poster."""

MAX_POSTER_BYTES = 10 * 1024 * 1024
"""Largest poster file accepted (bytes), whatever its source."""

MAX_POSTER_PIXELS = 40_000_000
"""Largest poster (pixels, before downscaling); a bigger one is refused as a
decompression bomb."""

POSTER_MAX_SIDE = 512
"""Posters are downscaled to fit this square (pixels) on load: CLIP sees 224-ish pixels,
and a batch of full-size posters would hold gigabytes."""

_READ_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class PosterError(ReelstreamError):
    """A poster reference that cannot be turned into an image. The message is the reason."""


# --- posters -------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> IP addresses`` (text) to connect to, e.g. ``resolve_host``."""


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``getaddrinfo`` gives for a TCP connection to ``host:port``, in its
    order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(address: str | IPAddress) -> bool:
    """Whether an IP address is on the public internet: not loopback, private, shared
    (CGNAT), link-local, site-local, multicast, reserved, unspecified or documentation,
    in IPv4 or IPv6. IPv4 addresses inside IPv6 ones (IPv4-mapped, 6to4, NAT64) are judged as the
    IPv4 address they reach."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:  # fec0::/10, deprecated but still routed inside some sites
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def load_poster(
    ref: str,
    *,
    poster_dir: Path | None = None,
    timeout_s: float = POSTER_TIMEOUT_S,
    max_bytes: int = MAX_POSTER_BYTES,
    max_side: int = POSTER_MAX_SIDE,
    resolve: Resolver = resolve_host,
    trusted_networks: Sequence[IPNetwork] = (),
) -> Image.Image:
    """Load a poster as an RGB image no larger than ``max_side`` on either side.

    Args:
        ref: A local file path (or ``file://`` URI) inside ``poster_dir`` (a relative
            path is relative to it), a ``data:image/...;base64,...`` URI or an
            ``http(s)://`` URL on a public address.
        poster_dir: The folder local posters must be in, once symlinks and ``..`` are
            resolved (``REELSTREAM_POSTER_DIR``); None refuses every local file.
        timeout_s: Deadline for an HTTP download, redirects included, seconds (default 5).
        max_bytes: Largest accepted encoded image, bytes (default 10 MiB).
        max_side: Larger images are downscaled (aspect kept) to fit (default 512 px).
        resolve: Looks up a URL's host once per request; the connection goes to an
            address it returned, after the check, never to a second lookup's answer.
        trusted_networks: Non-public networks posters may nevertheless be fetched from
            (none by default; tests serve posters on 127.0.0.1).

    Raises:
        PosterError: refused, unreadable, too big, too slow, or not an image; the message
            says which.
    """
    ref = ref.strip()
    if not ref:
        raise PosterError("empty poster reference")
    scheme = urllib.parse.urlsplit(ref).scheme.lower()
    if scheme == "data":
        raw = _read_data_uri(ref, max_bytes)
    elif scheme in ("http", "https"):
        raw = _read_url(ref, timeout_s, max_bytes, resolve, trusted_networks)
    elif scheme == "file":
        path = urllib.parse.unquote(urllib.parse.urlsplit(ref).path)
        raw = _read_file(path, poster_dir, max_bytes)
    elif len(scheme) > 1:
        # One letter is a Windows drive ("C:\..."), anything longer a scheme we do not fetch.
        raise PosterError(f"unsupported poster scheme {scheme!r} (use a path, data: or http(s):)")
    else:
        raw = _read_file(ref, poster_dir, max_bytes)
    return _decode_image(raw, max_side)


def _read_data_uri(ref: str, max_bytes: int) -> bytes:
    header, sep, data = ref.partition(",")
    if not sep:
        raise PosterError("data URI has no ',' before its data")
    media = header[len("data:") :].lower()
    if not media.startswith("image/") or not media.endswith(";base64"):
        raise PosterError(f"data URI must be data:image/...;base64, (got {header[:40]!r})")
    # Base64 is 4 characters per 3 bytes; refuse before decoding a huge string.
    if len(data) > (max_bytes // 3 + 1) * 4:
        raise PosterError(f"inline poster exceeds {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise PosterError(f"data URI is not valid base64: {exc}") from exc


def _read_url(
    url: str,
    timeout_s: float,
    max_bytes: int,
    resolve: Resolver,
    trusted: Sequence[IPNetwork],
) -> bytes:
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_POSTER_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise PosterError(f"poster redirected to unsupported scheme {scheme!r}")
        host = parts.hostname
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise PosterError(f"poster URL has an invalid port: {exc}") from exc
        if not host:
            raise PosterError("poster URL has no host")
        addresses = _checked_addresses(host, port, resolve, trusted)
        target = urllib.parse.quote(parts.path or "/", safe="/%!$&'()*+,;=:@~")
        if parts.query:
            target += "?" + urllib.parse.quote(parts.query, safe="/%!$&'()*+,;=:@~?")
        status, location, body = _get(scheme, host, port, addresses, target, deadline, max_bytes)
        if status in _REDIRECTS:
            if not location:
                raise PosterError(f"HTTP {status} fetching poster, with no Location")
            url = urllib.parse.urljoin(url, location)
            continue
        if status != 200:
            raise PosterError(f"HTTP {status} fetching poster")
        return body
    raise PosterError(f"poster URL redirected more than {MAX_POSTER_REDIRECTS} times")


def _checked_addresses(
    host: str, port: int, resolve: Resolver, trusted: Sequence[IPNetwork]
) -> list[str]:
    """The addresses ``host`` resolves to, all of them public (or trusted)."""
    try:
        addresses = list(resolve(host, port))
    except (OSError, UnicodeError) as exc:
        raise PosterError(f"cannot resolve poster host {host!r}: {exc}") from exc
    if not addresses:
        raise PosterError(f"poster host {host!r} has no address")
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError as exc:
            raise PosterError(f"poster host {host!r} resolves to {address!r}: {exc}") from exc
        if not is_public_address(ip) and not any(ip in network for network in trusted):
            # One non-public address is enough: a name that mixes them is suspect.
            raise PosterError(f"poster host {host!r} is not public: it resolves to {ip}")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to addresses checked beforehand, not to a fresh lookup of ``host``
    (which a DNS rebinding could point elsewhere); ``host`` names the Host header."""

    def __init__(self, host: str, port: int, addresses: Sequence[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def _open(self) -> socket.socket:
        error: OSError | None = None
        for address in self._addresses:
            try:
                return socket.create_connection((address, self.port), self.timeout)
            except OSError as exc:
                error = exc
        raise error or OSError("no address to connect to")

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS, the certificate checked against ``host``."""

    default_port = http.client.HTTPS_PORT

    def connect(self) -> None:
        raw = self._open()
        try:
            self.sock = ssl.create_default_context().wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _get(
    scheme: str,
    host: str,
    port: int,
    addresses: Sequence[str],
    target: str,
    deadline: float,
    max_bytes: int,
) -> tuple[int, str | None, bytes]:
    """One GET: the status, the Location header and the body (empty for a redirect)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise PosterError("poster download took longer than its time limit")
    kind = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    connection = kind(host, port, addresses, timeout=remaining)
    # The socket timeout bounds each read, not their sum: at the deadline the socket is
    # shut, so a server dripping bytes (headers included) cannot hold this thread.
    watchdog = threading.Timer(remaining, _shut, args=(connection,))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("GET", target, headers={"User-Agent": "reelstream/0.1"})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise PosterError(f"poster of {length} bytes exceeds {max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read(_READ_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise PosterError(f"poster exceeds {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise PosterError("poster download took longer than its time limit")
            chunks.append(chunk)
        if time.monotonic() > deadline:
            raise PosterError("poster download took longer than its time limit")
        return response.status, None, b"".join(chunks)
    except PosterError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if time.monotonic() >= deadline:
            raise PosterError("poster download took longer than its time limit") from exc
        raise PosterError(f"cannot fetch poster: {exc!r}") from exc
    finally:
        watchdog.cancel()
        connection.close()


def _shut(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        # The plain socket's shutdown, also under TLS: it wakes a blocked read.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _read_file(ref: str, poster_dir: Path | None, max_bytes: int) -> bytes:
    if poster_dir is None:
        raise PosterError("local poster files are refused: REELSTREAM_POSTER_DIR is not set")
    try:
        root = poster_dir.expanduser().resolve()
        # Symlinks and ".." resolved first, so neither can lead out of the folder.
        path = (root / ref).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise PosterError(f"cannot resolve poster file {ref[:200]!r}: {exc}") from exc
    if not path.is_relative_to(root):
        raise PosterError(f"poster file {ref[:200]!r} is outside REELSTREAM_POSTER_DIR")
    try:
        if not path.is_file():
            raise PosterError(f"poster file {ref[:200]!r} does not exist")
        with path.open("rb") as file:
            raw = file.read(max_bytes + 1)
    except OSError as exc:
        raise PosterError(f"cannot read poster file {ref[:200]!r}: {exc}") from exc
    if len(raw) > max_bytes:
        raise PosterError(f"poster file exceeds {max_bytes} bytes")
    return raw


def _decode_image(raw: bytes, max_side: int) -> Image.Image:
    if not raw:
        raise PosterError("poster is empty")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            if width * height > MAX_POSTER_PIXELS:
                raise PosterError(f"poster of {width}x{height} pixels is too large")
            # JPEG can decode straight at a reduced scale; other formats ignore this.
            image.draft("RGB", (max_side, max_side))
            rgb = image.convert("RGB")
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return rgb
    except PosterError:
        raise
    except Exception as exc:
        # Decoders raise many kinds of errors on malformed input; all mean "not an image".
        raise PosterError(f"poster is not a readable image: {exc!r}") from exc


# --- encoder -------------------------------------------------------------------------


class _ImageTower(Protocol):
    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...


class ImageEncoder:
    """An open_clip image tower in eval mode: PIL images in, normalised vectors out.

    Built by ``load_image_encoder``; ``model`` is an open_clip model with
    ``encode_image`` and ``preprocess`` its inference transform.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        name: str,
        device: torch.device,
        poster_dir: Path | None = None,
    ) -> None:
        self.poster_dir = poster_dir
        """The folder local poster files must be in (``REELSTREAM_POSTER_DIR``); None
        refuses them. ``load_posters`` of this encoder's movies takes it from here."""
        self._model = model.eval()
        self._tower = cast(_ImageTower, model)
        self._preprocess = preprocess
        self._name = name
        self._device = device
        # One forward of a blank image tells the output dimension of any architecture
        # and proves the weights give finite numbers before the service takes traffic.
        self._dim = int(self.encode([Image.new("RGB", (64, 64))]).shape[1])

    @property
    def dim(self) -> int:
        """Dimension of the image embeddings (the CLIP ``embed_dim``)."""
        return self._dim

    @property
    def name(self) -> str:
        """Short description of the model, part of the item encoder's model version."""
        return self._name

    def encode(self, images: list[Image.Image], batch_size: int = 32) -> Matrix:
        """L2-normalised float32 embeddings, one row per image (``batch_size`` per forward).

        Raises:
            NumericalError: the model produced a NaN or infinity.
        """
        rows: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                pixels = torch.stack([self._preprocess(img.convert("RGB")) for img in chunk])
                features = self._tower.encode_image(pixels.to(self._device), normalize=True)
                rows.append(features.float().cpu().numpy())
        if not rows:
            return np.zeros((0, getattr(self, "_dim", 0)), dtype=np.float32)
        matrix = np.concatenate(rows).astype(np.float32, copy=False)
        if not np.isfinite(matrix).all():
            raise NumericalError(f"NaN or infinity in image embeddings of {self._name}")
        return matrix


def load_image_encoder(settings: Settings) -> ImageEncoder | None:
    """The poster encoder described by the settings, or None when the modality is off.

    ``CLIP_WEIGHTS`` unset turns the image modality off. Otherwise ``CLIP_MODEL`` names
    the open_clip architecture (a built-in one, or one registered from the JSON file
    ``CLIP_MODEL_CONFIG``, whose file name must be ``<CLIP_MODEL>.json`` as open_clip
    names architectures by file stem) and ``CLIP_WEIGHTS`` its local state_dict file.

    Raises:
        ConfigurationError: a missing file, an unknown architecture, or weights that do
            not fit the architecture.
    """
    if settings.clip_weights is None:
        log.info("image modality off: CLIP_WEIGHTS not set")
        return None
    import open_clip

    name = settings.clip_model
    if ":" in name:
        # hf-hub: would download; local-dir: would ignore CLIP_WEIGHTS.
        raise ConfigurationError(
            f"CLIP_MODEL={name!r} must be a plain architecture name, not a hub or dir reference"
        )
    if settings.clip_model_config is not None:
        _register_config(open_clip, settings.clip_model_config, name)
    if name not in open_clip.list_models():
        raise ConfigurationError(
            f"CLIP_MODEL={name!r} is not an open_clip architecture; set CLIP_MODEL_CONFIG "
            "to a JSON config named after it to register a custom one"
        )
    weights = settings.clip_weights.expanduser()
    if not weights.is_file():
        raise ConfigurationError(f"CLIP_WEIGHTS={str(weights)!r} is not a file")
    device = resolve_device(settings.device)
    try:
        # An absolute path is never mistaken for a pretrained tag (which would download).
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=str(weights.resolve()),
            device=device,
            weights_only=True,
            pretrained_text=False,
            require_pretrained=True,
        )
    except Exception as exc:
        reason = str(exc).replace("\n", " ")
        raise ConfigurationError(
            f"CLIP_WEIGHTS={str(weights)!r} cannot be loaded as CLIP_MODEL={name!r}: {reason[:600]}"
        ) from exc
    # The digest tells two checkpoints of one architecture apart in model versions.
    encoder = ImageEncoder(
        model, preprocess, f"{name}@{_digest(weights)}", device, poster_dir=settings.poster_dir
    )
    log.info(
        "image modality on: model=%s weights=%s dim=%d device=%s poster_dir=%s",
        name,
        weights,
        encoder.dim,
        device,
        settings.poster_dir or "unset (local poster files refused)",
    )
    return encoder


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()[:8]


def _register_config(open_clip: Any, path: Path, name: str) -> None:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigurationError(f"CLIP_MODEL_CONFIG={str(path)!r} is not a file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"CLIP_MODEL_CONFIG={str(path)!r} is not JSON: {exc}") from exc
    missing = [k for k in _REQUIRED_CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise ConfigurationError(
            f"CLIP_MODEL_CONFIG={str(path)!r} is not an open_clip model config: "
            f"it lacks {', '.join(missing)}"
        )
    if path.stem != name:
        raise ConfigurationError(
            f"CLIP_MODEL_CONFIG={str(path)!r} registers architecture {path.stem!r} "
            f"(open_clip names it after the file) but CLIP_MODEL={name!r}"
        )
    open_clip.add_model_config(path)


POSTER_WORKERS = 8
"""Posters fetched or decoded in parallel per batch (I/O bound: URLs, files)."""


def load_posters(
    movies: Sequence[Movie], poster_dir: Path | None = None
) -> list[Image.Image | None]:
    """Each movie's poster image, or None when it has none or it cannot be loaded or is
    refused (the image modality is then masked for that movie, and the reason logged).
    ``poster_dir``: the folder local poster files must be in (``ImageEncoder.poster_dir``);
    None refuses them."""
    wanted = [(i, m) for i, m in enumerate(movies) if m.poster]
    images: list[Image.Image | None] = [None] * len(movies)
    if not wanted:
        return images
    with ThreadPoolExecutor(
        max_workers=min(POSTER_WORKERS, len(wanted)), thread_name_prefix="poster"
    ) as pool:
        futures = {
            i: pool.submit(load_poster, m.poster or "", poster_dir=poster_dir) for i, m in wanted
        }
        for i, movie in wanted:
            try:
                images[i] = futures[i].result()
            except Exception as exc:
                # Whatever goes wrong with a poster (image decoders raise many kinds of
                # errors), the movie is still embedded, without its image.
                reason = str(exc) if isinstance(exc, PosterError) else repr(exc)
                log.warning(
                    "poster unusable, image modality masked movie_id=%s reason=%s",
                    movie.movie_id,
                    reason,
                )
    return images
