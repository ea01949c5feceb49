"""Fixtures for the runtime tests (helpers live in runtime_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from runtime_harness import ServerThread, TinyModel, build_tiny_bundle, server_config


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


@pytest.fixture
def tiny_server(tiny: TinyModel) -> Iterator[ServerThread]:
    with ServerThread(server_config(tiny.bundle)) as srv:
        yield srv
