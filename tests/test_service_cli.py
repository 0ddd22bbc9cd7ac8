"""``mnemo serve`` as a user runs it: a subprocess on a loopback port, on the ONNX path without torch."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.image_bytes import png_bytes
from tests.service_helpers import smooth_images

pytest_plugins = ["tests.service_fixtures"]  # the shared fixtures: bundle_dir, server

# Runs `mnemo serve ...` and reports at exit whether anything imported torch.
WRAPPER = (
    "import atexit, sys; "
    "atexit.register(lambda: print('TORCH_IMPORTED', 'torch' in sys.modules, flush=True)); "
    "from mnemo.cli import main; sys.exit(main(sys.argv[1:]))"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_help_explains_every_flag_and_names_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "mnemo", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    from mnemo.service.cli import FLAGS
    from mnemo.service.settings import Settings

    for flag, (field, _, _) in FLAGS.items():
        assert flag in out and f"MNEMO_{field.upper()}" in out
    unnamed = [field for field in Settings.model_fields if f"MNEMO_{field.upper()}" not in out]
    assert unnamed == [] and len(FLAGS) >= 10  # the help is hand-written (no pydantic import for --help)


def start_serving(*args: str) -> tuple[subprocess.Popen, str]:
    """``mnemo serve ARGS`` on a free loopback port, once it is ready: (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-c", WRAPPER, "serve", *args, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "mnemo serve did not get ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def test_mnemo_serve_scores_on_onnx_without_importing_torch(bundle_dir):
    process, url = start_serving("--model-dir", str(bundle_dir))
    try:
        image = png_bytes(smooth_images(1, 1, 28)[0])
        response = httpx.post(
            f"{url}/v1/models/gray:score", content=image, headers={"content-type": "image/png"}
        )
        assert response.status_code == 200 and response.json()["results"][0]["verdict"] in ("ok", "anomalous")
        assert httpx.get(f"{url}/v1/models/gray").json()["backend"] == "onnxruntime"
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        output, _ = process.communicate(timeout=20)
    assert "TORCH_IMPORTED False" in output, output


def test_sigterm_with_a_stalled_upload_stops_within_the_shutdown_timeout(bundle_dir):
    # A body timeout far beyond the test: only the bounded graceful shutdown can end the stalled upload.
    process, url = start_serving(
        "--model-dir", str(bundle_dir), "--shutdown-timeout", "1", "--body-timeout", "60"
    )
    try:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as stalled:
            head = "POST /v1/models/gray:score HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
            stalled.sendall(f"{head}Content-Length: 100000\r\n\r\n".encode() + b"\x89PNG")
            time.sleep(0.3)  # the request is in the app, waiting for the rest of its body
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)  # what `docker stop` sends
            output, _ = process.communicate(timeout=15)
            stopped_s = time.monotonic() - start
            stalled.settimeout(5)
            answer = stalled.recv(65536)
    finally:
        if process.poll() is None:
            process.kill()
    assert stopped_s < 4.0, output  # 1 s for the upload, then the lifespan shutdown; was: never
    assert "timeout graceful shutdown exceeded" in output
    # answered, without a traceback (was: 500 and "Exception in ASGI application" for each)
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"shutting_down"' in answer, answer[:300]
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output


def test_a_settings_error_names_the_field_without_echoing_values(bundle_dir, monkeypatch, capsys):
    """A non-ASCII API key could never match (clients encode it differently; gRPC refuses it): refused at
    start, and neither that error nor another one prints the key (pydantic's own text would)."""
    from mnemo.cli import main

    monkeypatch.setenv("MNEMO_API_KEY", "s3cr3t-ké")
    assert main(["serve", "--model-dir", str(bundle_dir)]) == 2
    error = capsys.readouterr().err
    assert "API key must be printable ASCII" in error and "s3cr3t" not in error
    monkeypatch.setenv("MNEMO_API_KEY", "s3cr3t")
    monkeypatch.setenv("MNEMO_MAX_QUEUE", "2")
    assert main(["serve", "--model-dir", str(bundle_dir)]) == 2
    error = capsys.readouterr().err
    assert "max_queue (2) must be >= max_files" in error and "s3cr3t" not in error
