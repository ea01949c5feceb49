"""Fixtures for the runtime tests (helpers live in runtime_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from modes_rig import Rig, make_rig
from runtime_harness import ServerThread, TinyModel, build_tiny_bundle, server_config


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


@pytest.fixture
def tiny_server(tiny: TinyModel) -> Iterator[ServerThread]:
    with ServerThread(server_config(tiny.bundle)) as srv:
        yield srv


# -- the mode tests' rig (tests/runtime/modes_rig.py) -------------------------------------------
@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_bundle(tmp_path_factory.mktemp("wide-bundle"), k=3, n=5, seed=1)


@pytest.fixture(scope="module")
def executor() -> Any:
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture(scope="module")
def tiny_rig(tiny: TinyModel, executor: ThreadPoolExecutor) -> Rig:
    return make_rig(tiny, executor)


@pytest.fixture(scope="module")
def wide_rig(wide: TinyModel, executor: ThreadPoolExecutor) -> Rig:
    return make_rig(wide, executor)


@pytest.fixture(scope="module", params=["tiny", "wide"])
def rig(request: pytest.FixtureRequest) -> Rig:
    return request.getfixturevalue(f"{request.param}_rig")
