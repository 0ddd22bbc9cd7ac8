"""The score shortcut answers exactly as the app's own route does, and takes only score requests."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from mnemo.service.app import create_app
from mnemo.service.score_shortcut import ScoreShortcut
from mnemo.service.server import AnswerWhenShutDown, server_config
from tests.image_bytes import png_bytes
from tests.service_helpers import make_settings, metric_value, running_server, smooth_images

pytest_plugins = ["tests.service_fixtures"]

KEY = {"X-Key": "let-me-in"}
PNG = png_bytes(smooth_images(1, 1, 28)[0])
LIMIT = 48 * 1024
RAW = {**KEY, "content-type": "image/png"}


def chunks(total: int):
    for _ in range(total // 4096):
        yield b"\0" * 4096


# (name, method, path, keyword arguments for httpx.request)
CASES = [
    ("raw png", "POST", "/v1/models/gray:score", dict(content=PNG, headers=RAW)),
    ("multipart + heatmap", "POST", "/v1/models/color:score?heatmap=gray",
     dict(files=[("files", ("a.png", png_bytes(smooth_images(1, 3, 16)[0]), "image/png"))] * 2, headers=KEY)),
    ("no key", "POST", "/v1/models/gray:score", dict(content=PNG, headers={"content-type": "image/png"})),
    ("wrong key", "POST", "/v1/models/gray:score",
     dict(content=PNG, headers={"X-Key": "guess", "content-type": "image/png"})),
    ("broken image", "POST", "/v1/models/gray:score", dict(content=b"\x89PNG\r\n\x1a\nnope", headers=RAW)),
    ("unknown model", "POST", "/v1/models/nope:score", dict(content=PNG, headers=RAW)),
    ("bad query", "POST", "/v1/models/gray:score?heatmap=bogus", dict(content=PNG, headers=RAW)),
    ("wrong type", "POST", "/v1/models/gray:score",
     dict(content=b"hello", headers={**KEY, "content-type": "text/plain"})),
    ("declared too large", "POST", "/v1/models/gray:score", dict(content=bytes(2 * LIMIT), headers=RAW)),
    ("streamed too large", "POST", "/v1/models/gray:score", dict(content=chunks(2 * LIMIT), headers=RAW)),
    ("other method", "GET", "/v1/models/gray:score", dict(headers=KEY)),
]  # fmt: skip


def answers(url: str) -> dict[str, tuple[int, str, object]]:
    out = {}
    for name, method, path, kwargs in CASES:
        kwargs = {**kwargs, "content": chunks(2 * LIMIT)} if name == "streamed too large" else kwargs
        response = httpx.request(method, url + path, timeout=30, **kwargs)
        body = response.json()
        body.pop("timings_ms", None)  # measured per request
        out[name] = (response.status_code, response.headers["content-type"], body)
    return out


@contextlib.contextmanager
def served(bundle_dir, shortcut: bool):
    settings = make_settings(bundle_dir, api_key="let-me-in", api_key_header="X-Key", max_upload_bytes=LIMIT)
    app = create_app(settings)
    with running_server(settings, app=app, shortcut=shortcut) as url:
        yield url, app


def test_the_shortcut_answers_as_the_app_does(bundle_dir):
    results, errors = {}, {}
    for shortcut in (False, True):
        with served(bundle_dir, shortcut) as (url, app):
            results[shortcut] = answers(url)
            app.state.store.models["gray"].calibration = None  # a defect in the service itself: 500
            broken = httpx.post(f"{url}/v1/models/gray:score", content=PNG, headers=RAW)
            results[shortcut]["unexpected"] = (broken.status_code, broken.json())
            assert httpx.post(f"{url}/v1/models/color:score", content=PNG, headers=RAW).status_code == 200
            metrics = httpx.get(f"{url}/metrics").text
            errors[shortcut] = {
                kind: metric_value(metrics, "mnemo_errors_total", kind=kind)
                for kind in ("unauthorized", "payload_too_large", "unknown_model", "internal")
            }
    assert results[True] == results[False]
    statuses = {name: answer[0] for name, answer in results[True].items()}
    assert statuses == {
        "raw png": 200, "multipart + heatmap": 200, "no key": 401, "wrong key": 401, "broken image": 400,
        "unknown model": 404, "bad query": 422, "wrong type": 415, "declared too large": 413,
        "streamed too large": 413, "other method": 405, "unexpected": 500,
    }  # fmt: skip
    assert errors[True] == errors[False] and errors[True]["payload_too_large"] == 2


def test_only_score_posts_take_the_shortcut(bundle_dir):
    settings = make_settings(bundle_dir)
    app = create_app(settings)
    served = server_config(settings, app).app  # what mnemo serve runs
    assert isinstance(served, AnswerWhenShutDown) and isinstance(served.app, ScoreShortcut)
    assert server_config(settings, app, shortcut=False).app.app is app
    shortcut = ScoreShortcut(app)
    taken = []

    async def record(kind, scope, receive, send):
        taken.append((kind, scope.get("path_params")))

    shortcut.app = lambda *a: record("app", *a)
    shortcut.limited = lambda *a: record("shortcut", *a)
    scopes = [
        {"type": "http", "method": "POST", "path": "/v1/models/gray:score"},
        {"type": "http", "method": "POST", "path": "/v1/models/gray.v2_x-y:score"},
        {"type": "http", "method": "GET", "path": "/v1/models/gray:score"},
        {"type": "http", "method": "POST", "path": "/v1/models/gray:scores"},
        {"type": "http", "method": "POST", "path": "/v1/models/a/b:score"},
        {"type": "http", "method": "POST", "path": "/v2/models/gray/infer"},
        {"type": "http", "method": "POST", "path": "/api/v1/models/gray:score", "root_path": "/api"},
        {"type": "lifespan"},
    ]
    for scope in scopes:
        asyncio.run(shortcut(scope, None, None))
    assert taken == [
        ("shortcut", {"name": "gray"}),
        ("shortcut", {"name": "gray.v2_x-y"}),
        *[("app", None)] * 6,
    ]
