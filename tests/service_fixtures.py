"""Fixtures shared by the service tests; a test module loads them with
``pytest_plugins = ["tests.service_fixtures"]`` so the session-scoped bundles are exported only once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_helpers import BUNDLE_SPECS, export_tiny_bundle, make_settings, running_server


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """A model directory with the two tiny bundles ``gray`` (1×28×28) and ``color`` (3×16×16)."""
    root = tmp_path_factory.mktemp("bundles")
    for spec in BUNDLE_SPECS:
        export_tiny_bundle(root, spec, spec=spec)
    return root


@pytest.fixture(scope="module")
def server(bundle_dir) -> Iterator[str]:
    """One shared server per test module with default knobs except a short batching window."""
    with running_server(make_settings(bundle_dir, max_wait_ms=20, max_batch_size=8)) as url:
        yield url
