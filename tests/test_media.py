"""Loading images from data: URLs, base64, http(s) and allowed local files, and refusing everything else."""

from __future__ import annotations

import base64
import contextlib
import http.server
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from herd.frontend.media import MediaError, decode_image, load_image, read_image_bytes
from herd.frontend.media_guard import MediaHostPolicy, is_public

from local_web import Route, data_url, encode, local_web

RED = Image.new("RGB", (5, 3), (255, 0, 0))
PNG = encode(RED)
JPEG = encode(RED, "JPEG")
NOISE_PNG = encode(Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48))


def _slow(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.end_headers()
    with contextlib.suppress(OSError):  # the client gives up first
        for _ in range(40):
            handler.wfile.write(b"x" * 10)
            handler.wfile.flush()
            time.sleep(0.05)


def _endless(handler: http.server.BaseHTTPRequestHandler) -> None:
    # No Content-Length: the size cap must stop the download.
    handler.send_response(200)
    handler.end_headers()
    with contextlib.suppress(OSError):
        for _ in range(1000):
            handler.wfile.write(b"\0" * 65536)


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    routes: dict[str, Route] = {
        "/red.png": (200, {"Content-Type": "image/png"}, PNG),
        "/hop": (302, {"Location": "/red.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/page": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
        "/big": (200, {"Content-Type": "image/png"}, PNG + b"\0" * 5000),
        "/slow": _slow,
        "/endless": _endless,
    }
    with local_web(routes) as url:
        yield url


def load(url: str, **kwargs: object) -> Image.Image:
    limits = {
        "allowed_local_media_path": None,
        "timeout_s": 5.0,
        "max_bytes": 1 << 20,
        "max_redirects": 3,
        "allowed_media_domains": ("127.0.0.1",),  # the test server; refused by default (see the guard tests)
    }
    return load_image(url, **{**limits, **kwargs})  # type: ignore[arg-type]


def test_data_url_and_raw_base64() -> None:
    assert load(data_url(PNG)).tobytes() == RED.tobytes()
    assert load(data_url(PNG, "application/octet-stream")).size == (5, 3)
    raw = base64.b64encode(JPEG).decode()
    assert raw.startswith("/9j/")  # a JPEG's base64 looks like a path: it must still read as base64
    assert load(raw).size == (5, 3)
    assert load(base64.encodebytes(PNG).decode()).size == (5, 3)  # with MIME line breaks


def test_http_url_with_a_redirect(web: str) -> None:
    assert load(f"{web}/red.png").tobytes() == RED.tobytes()
    assert load(f"{web}/hop").size == (5, 3)


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        ("/missing.png", {}, "HTTP 404"),
        ("/loop", {}, "more than 3 redirects"),
        ("/hop", {"max_redirects": 0}, "more than 0 redirects"),
        ("/big", {"max_bytes": 1000}, "image too large: more than 1000 bytes"),
        ("/endless", {"max_bytes": 200_000}, "image too large: more than 200000 bytes"),
        ("/slow", {"timeout_s": 0.5}, "timed out"),
        ("/page", {}, "unsupported image format text/html"),
    ],
)
def test_http_failures(web: str, path: str, kwargs: dict, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        load(f"{web}{path}", **kwargs)


def test_unreachable_url() -> None:
    with pytest.raises(MediaError, match="cannot fetch"):
        load("http://127.0.0.1:1/x.png", timeout_s=2.0)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (data_url(NOISE_PNG[: len(NOISE_PNG) // 2]), "corrupt PNG image"),
        (data_url(PNG[:20]), "corrupt image"),
        (data_url(b"definitely not an image"), "cannot decode the image"),
        (data_url(encode(RED, "PPM"), "image/x-portable-pixmap"), "unsupported image format PPM"),
        (data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"), "unsupported image format image/svg"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported format"),
        ("data:image/png;base64", "malformed data URL"),
        ("not base64 at all!", "not valid base64"),
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        (data_url(PNG), "image too large"),  # with max_bytes below
    ],
)
def test_bad_images(url: str, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        load(url, max_bytes=len(PNG) - 1 if "too large" in message else 1 << 20)


def test_pixel_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("1", (20000, 20000)))  # 400 Mpixels in a few tens of kB
    assert len(bomb) < 100_000
    with pytest.raises(MediaError, match="image too large"):
        decode_image(bomb)
    with pytest.raises(MediaError, match="20x20 pixels, more than the limit of 399"):
        decode_image(encode(Image.new("RGB", (20, 20))), max_pixels=399)


def test_truncated_jpeg_is_corrupt() -> None:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    with pytest.raises(MediaError, match="corrupt JPEG image"):
        decode_image(encode(noisy, "JPEG")[:-300])


def test_exif_orientation_is_applied_and_metadata_dropped() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright picture is 3 wide, 5 high
    image = decode_image(encode(RED, "JPEG", exif=exif.tobytes(), icc_profile=b"x" * 100))
    assert image.size == (3, 5)
    assert "icc_profile" not in image.info and "exif" not in image.info


def test_transparency_survives_decoding() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert decode_image(encode(palette, transparency=1)).info["transparency"] == 1


def test_local_files_only_under_the_allowed_folder(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "media", tmp_path / "secret"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "red.png").write_bytes(PNG)
    (outside / "red.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(outside / "red.png")
    root = str(allowed)
    assert load(f"file://{allowed}/red.png", allowed_local_media_path=root).size == (5, 3)
    assert load(str(allowed / "red.png"), allowed_local_media_path=root).size == (5, 3)
    assert load("red.png", allowed_local_media_path=root).size == (5, 3)  # relative to the allowed folder
    with pytest.raises(MediaError, match="local files are not allowed"):
        load(str(allowed / "red.png"))
    with pytest.raises(MediaError, match="local files are not allowed"):
        load(f"file://{allowed}/red.png")
    for escape in (str(outside / "red.png"), f"{allowed}/../secret/red.png", "link.png", f"file://{outside}/red.png"):
        with pytest.raises(MediaError, match="outside the allowed local media path"):
            load(escape, allowed_local_media_path=root)
    with pytest.raises(MediaError, match="cannot read"):
        load("missing.png", allowed_local_media_path=root)
    with pytest.raises(MediaError, match="image too large"):
        load("red.png", allowed_local_media_path=root, max_bytes=10)
    with pytest.raises(MediaError, match="another host"):
        load("file://example.com/red.png", allowed_local_media_path=root)


# -- which hosts may be fetched (server-side request forgery) ------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x.png",
        "http://localhost:1/x.png",
        "http://[::1]:1/x.png",
        "http://[::ffff:127.0.0.1]:1/x.png",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.1.2.3/x.png",
        "http://192.168.0.1/x.png",
        "http://0.0.0.0:1/x.png",
    ],
)
def test_loopback_private_and_metadata_hosts_are_refused_by_default(url: str) -> None:
    with pytest.raises(MediaError, match="loopback, private, link-local or reserved"):
        load(url, allowed_media_domains=None)


def test_allowed_media_domains_is_the_only_list_fetched(web: str) -> None:
    with pytest.raises(MediaError, match="127.0.0.1"):  # refused by default, naming the address
        load(f"{web}/red.png", allowed_media_domains=None)
    assert load(f"{web}/red.png", allowed_media_domains=("127.0.0.1",)).size == (5, 3)
    with pytest.raises(MediaError, match="not in --allowed-media-domains"):
        load(f"{web}/red.png", allowed_media_domains=("images.example.com",))


def test_every_redirect_hop_is_checked(web: str) -> None:
    port = web.rsplit(":", 1)[1]
    with local_web({"/to-localhost": (302, {"Location": f"http://localhost:{port}/red.png"}, b"")}) as other:
        hop_elsewhere = f"{other}/to-localhost"
        # The first host is allowed by name; the one it redirects to is not.
        with pytest.raises(MediaError, match="'localhost' is not in --allowed-media-domains"):
            load(hop_elsewhere, allowed_media_domains=("127.0.0.1",))


def test_a_host_that_resolves_to_a_private_address_is_refused() -> None:
    policy = MediaHostPolicy()
    policy.resolve = lambda host, port, **kw: [(2, 1, 6, "", ("10.0.0.7", port))]  # type: ignore[assignment]
    with pytest.raises(MediaError, match="'images.example.com' resolves to 10.0.0.7"):
        read_image_bytes(
            "http://images.example.com/cat.png",
            allowed_local_media_path=None,
            timeout_s=5,
            max_bytes=1000,
            max_redirects=0,
            hosts=policy,
        )


def test_the_connected_address_is_checked_too(web: str) -> None:
    # DNS rebinding: the check's lookup says public, the connection lands on loopback; nothing is read.
    policy = MediaHostPolicy()
    policy.resolve = lambda host, port, **kw: [(2, 1, 6, "", ("93.184.216.34", port))]  # type: ignore[assignment]
    with pytest.raises(MediaError, match="resolves to 127.0.0.1"):
        read_image_bytes(
            f"{web}/red.png", allowed_local_media_path=None, timeout_s=5, max_bytes=1000, max_redirects=0, hosts=policy
        )


def test_public_and_internal_addresses() -> None:
    assert is_public("93.184.216.34") and is_public("2606:4700::1111")
    assert not any(is_public(a) for a in ("127.0.0.1", "::1", "169.254.169.254", "100.64.0.1", "fe80::1%eth0"))
