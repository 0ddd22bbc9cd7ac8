"""Every kind of bad input gets a clear JSON error (or is converted) and the service keeps serving."""

from __future__ import annotations

import http.client
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.image_bytes import encode, png_bytes, png_declaring, progressive_jpeg
from tests.service_helpers import make_settings, metric_value, running_server, smooth_images

pytest_plugins = ["tests.service_fixtures"]  # the shared fixtures: bundle_dir, server

GOOD = png_bytes(smooth_images(1, 1, 28, seed=4)[0])


@pytest.fixture(scope="module")
def strict(bundle_dir) -> Iterator[str]:
    """Small limits so the limit paths are cheap to hit."""
    settings = make_settings(
        bundle_dir, max_upload_bytes=4096, max_files=2, max_queue=2, max_image_pixels=10_000
    )
    with running_server(settings) as url:
        yield url


def post_raw(url: str, data, content_type: str | None = "image/png", model: str = "gray") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{url}/v1/models/{model}:score", content=data, headers=headers, timeout=30)


def post_files(url: str, *images: bytes, model: str = "gray") -> httpx.Response:
    files = [("files", (f"f{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/v1/models/{model}:score", files=files, timeout=30)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def score_of(response: httpx.Response) -> float:
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["score"]


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"hello, I am definitely not a picture", "not_an_image"),
        (b"", "empty"),
        (GOOD[: len(GOOD) // 2], "truncated"),
        (GOOD[:20], "truncated"),  # cut inside the header
        (GOOD[:40] + bytes(len(GOOD) - 40), "truncated"),  # right header, zeroed (corrupt) pixel data
        (png_declaring(30_000, 30_000), "too_large"),  # a decompression bomb: ~100 bytes, 900 MP declared
        (progressive_jpeg(Image.new("L", (512, 512), 128), 500), "too_large"),  # a pass over it per scan
    ],
    ids=["not-an-image", "zero-bytes", "truncated", "cut-header", "corrupt", "bomb", "jpeg-scan-flood"],
)
def test_undecodable_uploads_get_clear_errors(server, data, reason):
    error = error_of(post_raw(server, data), 400)
    assert error["code"] == reason and error["message"]
    named = error_of(post_files(server, GOOD, data), 400)  # in a multipart request the file is named
    assert named["code"] == reason and named["file"] == "f1.png"


def test_pixel_limit_is_a_setting(strict):
    error = error_of(post_raw(strict, png_bytes(np.full((101, 101), 128, np.uint8))), 400)  # 10 201 px
    assert error["code"] == "too_large" and "10,000" in error["message"]


def test_modes_are_converted_to_what_the_model_expects(server):
    gray8 = smooth_images(1, 1, 28, seed=6)[0, ..., 0]
    rgb8 = smooth_images(1, 3, 28, seed=6)[0]
    reference_gray = score_of(post_raw(server, png_bytes(gray8)))
    sixteen = encode(Image.fromarray(gray8.astype(np.uint16) * 257))  # same intensities on 0…65535
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    assert score_of(post_raw(server, sixteen)) == pytest.approx(reference_gray, abs=1e-5)
    reference_rgb = score_of(post_raw(server, png_bytes(rgb8)))
    opaque = np.concatenate([rgb8, np.full((28, 28, 1), 255, np.uint8)], axis=-1)
    assert score_of(post_raw(server, encode(Image.fromarray(opaque, "RGBA")))) == pytest.approx(reference_rgb)
    palette = Image.fromarray(rgb8).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    as_rgb = score_of(post_raw(server, encode(palette.convert("RGB"))))
    assert score_of(post_raw(server, encode(palette))) == pytest.approx(as_rgb, abs=1e-6)
    for image, fmt in [
        (Image.fromarray(rgb8).convert("CMYK"), "JPEG"),
        (Image.fromarray(rgb8).convert("LA"), "PNG"),
        (Image.fromarray(gray8).convert("1"), "PNG"),
    ]:
        assert np.isfinite(score_of(post_raw(server, encode(image, fmt), f"image/{fmt.lower()}")))


@pytest.mark.parametrize("shape", [(3, 3), (20, 1000), (900, 700)])
def test_images_far_from_the_model_size_are_resized(server, shape):
    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    body = post_raw(server, png_bytes(image), model="color").json()
    assert body["results"][0]["score"] >= 0


def test_upload_size_limit_with_and_without_content_length(strict):
    big = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)  # ~4 KB+ of noise PNG
    data = png_bytes(big)
    assert len(data) > 4096
    assert error_of(post_raw(strict, data), 413)["code"] == "payload_too_large"
    v2 = httpx.post(f"{strict}/v2/models/gray/infer", content=data, timeout=10)  # the protocol's shape there
    assert v2.status_code == 413 and "limit" in v2.json()["error"]
    # A client that sends its whole (large) body before reading still reads the 413: closing the connection
    # under it made the kernel reset it (http.client: a reset 10 times out of 10)
    port = int(strict.rsplit(":", 1)[1])
    for _ in range(3):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        connection.request(
            "POST", "/v1/models/gray:score", body=b"x" * (2 << 20), headers={"Content-Type": "image/png"}
        )
        assert connection.getresponse().status == 413
        connection.close()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    assert error_of(post_raw(strict, chunked()), 413)["code"] == "payload_too_large"
    assert error_of(post_files(strict, data), 413)["code"] == "payload_too_large"
    counted = metric_value(
        httpx.get(f"{strict}/metrics").text, "mnemo_errors_total", kind="payload_too_large"
    )
    assert counted == 7


def test_too_many_files(strict):
    small = png_bytes(smooth_images(1, 1, 8)[0])
    error = error_of(post_files(strict, small, small, small), 400)
    assert error["code"] == "too_many_files" and "2" in error["message"]
    assert post_files(strict, small, small).status_code == 200


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded"]
)
def test_wrong_content_type_is_415(server, content_type):
    error = error_of(post_raw(server, b'{"image": 1}', content_type), 415)
    assert error["code"] == "unsupported_media_type" and "application/octet-stream" in error["message"]


@pytest.mark.parametrize("content_type", ["application/octet-stream", None])
def test_a_raw_body_typed_as_bytes_or_untyped_is_read_as_an_image(server, content_type):
    """What camera SDKs, requests.post(url, data=...) and load tools send: the decoder sniffs the format."""
    small = png_bytes(smooth_images(1, 1, 8)[0])
    response = post_raw(server, small, content_type)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["verdict"] in ("ok", "anomalous")
    assert error_of(post_raw(server, b'{"image": 1}', content_type), 400)["code"] == "not_an_image"


def test_multipart_without_a_file_part(server):
    forced = httpx.post(
        f"{server}/v1/models/gray:score",
        content=b"--xx\r\nContent-Disposition: form-data; name=note\r\n\r\nhi\r\n--xx--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xx"},
    )
    assert error_of(forced, 400)["code"] == "no_image"


def test_unknown_model_and_bad_parameters(server):
    assert error_of(post_raw(server, GOOD, model="nope"), 404)["code"] == "unknown_model"
    bad = httpx.post(
        f"{server}/v1/models/gray:score?heatmap=hologram", content=GOOD, headers={"content-type": "image/png"}
    )
    assert error_of(bad, 422)["code"] == "invalid_parameter"
    nan = httpx.post(
        f"{server}/v1/models/gray:score?threshold=nan", content=GOOD, headers={"content-type": "image/png"}
    )
    assert error_of(nan, 422)["code"] == "invalid_parameter"


def test_still_serving_after_all_that(server, strict):
    for url in (server, strict):
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert np.isfinite(score_of(post_raw(url, GOOD)))
    metrics = httpx.get(f"{server}/metrics").text
    assert metric_value(metrics, "mnemo_errors_total", kind="not_an_image") >= 2
    assert metric_value(metrics, "mnemo_requests_total", model="_unknown", status="404") >= 1
