"""Review capture (issue 14): scored images kept on disk with their answer, for review and retraining.

With ``MNEMO_CAPTURE_DIR`` set, every image judged anomalous, and a random share
``MNEMO_CAPTURE_OK_FRACTION`` of the ok ones, is saved as it was uploaded (its own bytes and format)
beside a JSON file with its result, model and version and the time:

    <dir>/<model>/<verdict>/<UTC time>-<id>.<png|jpeg|...>   and   ...-<id>.json

Never in a request's way: the request only offers the image to a bounded queue (``MNEMO_CAPTURE_QUEUE``
images) and moves on; one writer thread drains it. When the queue is full, or a write fails (disk full,
permissions), the image is dropped and counted (``mnemo_capture_dropped_total{reason}``), and the service
carries on. The store is bounded too: past ``MNEMO_CAPTURE_MAX_MB`` the oldest captures are deleted
first (files already in the folder at start count, so a restart does not reset the cap).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import queue
import random
import stat
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger("mnemo.service")
VERDICTS = ("anomalous", "ok")


@dataclass(frozen=True)
class Capture:
    model: str
    version: str
    verdict: str
    data: bytes
    result: dict[str, Any]  # the image's answer, as the client got it


class CaptureStore:
    """A bounded folder of captures fed through a bounded queue by one writer thread."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        ok_fraction: float = 0.0,
        queue_size: int = 64,
        on_saved=None,
        on_dropped=None,
    ) -> None:
        self.root, self.max_bytes, self.ok_fraction = Path(root), max_bytes, ok_fraction
        self.root.mkdir(parents=True, exist_ok=True)
        self.pending: queue.Queue[Capture | None] = queue.Queue(maxsize=queue_size)
        self.on_saved = on_saved or (lambda model, verdict: None)
        self.on_dropped = on_dropped or (lambda reason: None)
        self.files: deque[tuple[Path, int]] = deque(self._existing())  # oldest first
        self.bytes = sum(size for _, size in self.files)
        self.random = random.Random()
        self.thread = threading.Thread(target=self._write_all, name="mnemo-capture", daemon=True)
        self.thread.start()

    def wanted(self, verdict: str) -> bool:
        return verdict == "anomalous" or (self.ok_fraction > 0 and self.random.random() < self.ok_fraction)

    def offer(self, capture: Capture) -> None:
        """Queue ``capture`` if its verdict is to be kept; never blocks (a full queue drops it)."""
        if not self.wanted(capture.verdict):
            return
        try:
            self.pending.put_nowait(capture)
        except queue.Full:
            self.on_dropped("queue_full")

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (within ``timeout_s``), then stop the writer."""
        with contextlib.suppress(queue.Full):
            self.pending.put(None, timeout=timeout_s)
        self.thread.join(timeout_s)

    # --------------------------------------------------------------------------------- writer thread

    def _write_all(self) -> None:
        while (capture := self.pending.get()) is not None:
            try:
                self._write(capture)
                self.on_saved(capture.model, capture.verdict)
            except OSError as exc:
                logger.warning(
                    "capture of a %s image from %s failed: %s", capture.verdict, capture.model, exc
                )
                self.on_dropped("write_failed")

    def _write(self, capture: Capture) -> None:
        folder = self.root / capture.model / capture.verdict
        folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        stem = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}"
        image = folder / f"{stem}.{image_extension(capture.data)}"
        record = {
            "model": capture.model,
            "version": capture.version,
            "time": now.isoformat(),
            **capture.result,
        }
        meta = folder / f"{stem}.json"
        image.write_bytes(capture.data)
        meta.write_text(json.dumps(record, indent=1))
        for path in (image, meta):
            size = path.stat().st_size
            self.files.append((path, size))
            self.bytes += size
        self._evict()

    def _evict(self) -> None:
        """Delete the oldest captures until the store is within ``max_bytes``."""
        while self.bytes > self.max_bytes and self.files:
            path, size = self.files.popleft()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.bytes -= size

    def _existing(self) -> list[tuple[Path, int]]:
        found = []
        for path in self.root.glob("*/*/*"):
            if path.parent.name in VERDICTS:
                with contextlib.suppress(FileNotFoundError):  # another worker may be evicting it
                    info = path.stat()
                    if stat.S_ISREG(info.st_mode):
                        found.append((path, info))
        return [(p, st.st_size) for p, st in sorted(found, key=lambda item: (item[1].st_mtime, item[0].name))]


def image_extension(data: bytes) -> str:
    """The file extension of the image's own format (its header), ``bin`` if Pillow cannot tell."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format or "bin").lower()
    except Exception:
        return "bin"
