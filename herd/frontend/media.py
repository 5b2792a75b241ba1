"""Images from what a request names: `data:` URLs, raw base64, http(s) URLs, and local files under one
allowed folder (`--allowed-local-media-path`, vLLM's flag; off by default).

Everything a client controls is bounded: bytes (also while downloading), pixels (checked from the header,
before decoding, so a small file cannot expand into gigabytes), redirects and time; and the hosts fetched
from (`media_guard`: no loopback, private or metadata addresses unless allowed by name). Only common photo
and screenshot formats are decoded. Every failure is a `MediaError` whose message a client can act on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
import urllib.parse
from pathlib import Path

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from herd.frontend.media_guard import ForbiddenMediaURL, MediaHostPolicy

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers cameras' multi-picture MPO
_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_NEUTRAL_TYPES = ("", "application/octet-stream", "binary/octet-stream")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # a 4k PNG of noise is about 25 MB
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_MAX_PIXELS = 8192 * 8192  # Llama 4 sees at most 16 tiles of 336 px; beyond this is only cost


class MediaError(ValueError):
    """An image that cannot be used; the message says why (and never repeats a whole data URL)."""


def load_image(
    url: str,
    *,
    allowed_local_media_path: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_media_domains: tuple[str, ...] | None = None,
) -> Image.Image:
    """The decoded image `url` names (blocking: network and decoding; see `load_image_async`)."""
    data, declared = read_image_bytes(
        url,
        allowed_local_media_path=allowed_local_media_path,
        timeout_s=timeout_s,
        max_bytes=max_bytes,
        max_redirects=max_redirects,
        hosts=MediaHostPolicy(allowed_media_domains),
    )
    return decode_image(data, max_pixels=max_pixels, declared_type=declared)


async def load_image_async(url: str, **limits: object) -> Image.Image:
    """`load_image` in a worker thread, so an event loop keeps serving while images download and decode."""
    return await asyncio.to_thread(load_image, url, **limits)  # type: ignore[arg-type]


def read_image_bytes(
    url: str,
    *,
    allowed_local_media_path: str | None,
    timeout_s: float,
    max_bytes: int,
    max_redirects: int,
    hosts: MediaHostPolicy | None = None,
) -> tuple[bytes, str | None]:
    """The bytes `url` names and the media type its source declared (None when it declares none)."""
    scheme = url[: url.find(":")].lower() if ":" in url[:12] else ""
    if scheme == "data":
        return _read_data_url(url, max_bytes)
    if scheme in ("http", "https"):
        return _fetch(url, timeout_s, max_bytes, max_redirects, hosts or MediaHostPolicy())
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"file URL {_short(url)} names another host; only local files can be read")
        return _read_local(urllib.parse.unquote(parsed.path), allowed_local_media_path, max_bytes), None
    if scheme and scheme.isalpha() and len(scheme) > 1:
        raise MediaError(f"unsupported URL scheme {scheme!r}: use data:, http(s):, file: or base64")
    # base64 never contains '.', so a name with an image file's suffix is a path, not encoded bytes.
    if "." in url and url.lower().endswith(_FILE_SUFFIXES):
        return _read_local(url, allowed_local_media_path, max_bytes), None
    return _decode_base64(url, max_bytes, "base64 image"), None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, declared_type: str | None = None) -> Image.Image:
    """Decode `data` (one of SUPPORTED_FORMATS; the first frame of an animation), upright per its EXIF."""
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise MediaError(_unidentified(data, declared_type)) from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"image too large: {e}") from None
    except Exception as e:  # a header Pillow recognises but cannot parse
        raise MediaError(f"corrupt image: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"image too large: {width}x{height} pixels, more than the limit of {max_pixels} pixels")
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:  # truncated or corrupt pixel data
        raise MediaError(f"corrupt {image.format} image: {e}") from None
    # Keep only what preprocessing reads: info can hold megabytes of EXIF and ICC data.
    image.info = {k: v for k, v in image.info.items() if k == "transparency"}
    return image


def _read_data_url(url: str, max_bytes: int) -> tuple[bytes, str | None]:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaError("malformed data URL: no ',' before the data")
    media_type, *params = header.split(";")
    media_type = media_type.strip().lower()
    if media_type not in _NEUTRAL_TYPES and not media_type.startswith("image/"):
        raise MediaError(f"unsupported format: a data URL of type {media_type!r} is not an image")
    if "base64" in (p.strip().lower() for p in params):
        return _decode_base64(payload, max_bytes, "data URL"), media_type or None
    data = urllib.parse.unquote_to_bytes(payload)
    _check_size(len(data), max_bytes)
    return data, media_type or None


def _decode_base64(text: str, max_bytes: int, what: str) -> bytes:
    text = "".join(text.split())  # MIME-style line breaks
    _check_size(len(text) * 3 // 4, max_bytes)  # before decoding: do not allocate what will be refused
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(
            f"{what} {_short(text)} is not valid base64 (expected a data: URL, an http(s) URL, a file or base64)"
        ) from None


def _fetch(
    url: str, timeout_s: float, max_bytes: int, max_redirects: int, hosts: MediaHostPolicy
) -> tuple[bytes, str | None]:
    deadline = time.monotonic() + timeout_s
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            # Redirects are followed here, not by httpx: every hop's host must pass the policy.
            for _ in range(max_redirects + 1):
                trusted = hosts.check_url(url)
                with client.stream("GET", url) as response:
                    if not trusted:
                        _check_peer(response, url, hosts)
                    if response.is_redirect:
                        url = str(response.next_request.url) if response.next_request else url
                        continue
                    return _read_body(response, url, timeout_s, max_bytes, deadline)
            raise MediaError(f"fetching {_short(url)}: more than {max_redirects} redirects")
    except ForbiddenMediaURL as e:
        raise MediaError(str(e)) from None
    except httpx.TimeoutException:
        raise MediaError(f"fetching {_short(url)} timed out after {timeout_s:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise MediaError(f"cannot fetch {_short(url)}: {e or type(e).__name__}") from None


def _check_peer(response: httpx.Response, url: str, hosts: MediaHostPolicy) -> None:
    """The address the connection really went to must be public too (DNS may answer differently now)."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer is None:  # no way to tell (not a plain TCP stream): the resolution check stands alone
        return
    hosts.check_address(urllib.parse.urlsplit(url).hostname or "", str(peer[0]))


def _read_body(
    response: httpx.Response, url: str, timeout_s: float, max_bytes: int, deadline: float
) -> tuple[bytes, str | None]:
    if response.status_code != 200:
        raise MediaError(f"fetching {_short(url)} failed: HTTP {response.status_code}")
    length = response.headers.get("content-length")
    if length is not None and length.isdigit():
        _check_size(int(length), max_bytes)
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        _check_size(len(data), max_bytes)
        if time.monotonic() > deadline:  # a server that trickles bytes must not hold us forever
            raise MediaError(f"fetching {_short(url)} timed out after {timeout_s:g} s")
    declared = response.headers.get("content-type", "").split(";")[0].strip().lower() or None
    return bytes(data), declared


def _read_local(name: str, allowed: str | None, max_bytes: int) -> bytes:
    if allowed is None:
        raise MediaError("local files are not allowed: start the server with --allowed-local-media-path DIR")
    root = Path(allowed).resolve()
    # resolve() follows symlinks and folds '..', so what is checked is the file that would be read.
    path = (root / name).resolve()  # a relative name is relative to the allowed folder
    if not path.is_relative_to(root):
        raise MediaError(f"{name!r} is outside the allowed local media path")
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except IsADirectoryError:
        raise MediaError(f"{name!r} is a folder, not an image file") from None
    except OSError as e:
        raise MediaError(f"cannot read {name!r}: {e.strerror or e}") from None
    _check_size(len(data), max_bytes)
    return data


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise MediaError(f"image too large: more than {max_bytes} bytes")


def _unidentified(data: bytes, declared_type: str | None) -> str:
    # Name the format when Pillow knows it (header only: nothing is decoded), so the client learns why.
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format
    except Exception:
        found = None
    supported = ", ".join(SUPPORTED_FORMATS)
    if found is not None:
        return f"unsupported image format {found}; supported: {supported}"
    if declared_type not in (None, *_NEUTRAL_TYPES) and not _is_supported_type(declared_type):
        return f"unsupported image format {declared_type}; supported: {supported}"
    return f"cannot decode the image: corrupt, or not in a supported format ({supported})"


def _is_supported_type(media_type: str) -> bool:
    subtype = media_type.removeprefix("image/").removeprefix("x-")
    return media_type.startswith("image/") and subtype in {"png", "jpeg", "jpg", "webp", "gif", "bmp", "tiff"}


def _short(text: str, limit: int = 64) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")
