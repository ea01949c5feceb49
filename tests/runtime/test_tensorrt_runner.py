"""TensorRTRunner's host code on CPU: an emulated pycuda (tests/fake_pycuda.py: contexts are
per thread, as on a GPU) and a fake TensorRT with the documented name-based API, whose
"plan" computes y = 2 x. The real TensorRT path has not run anywhere yet (README "GPU")."""

from __future__ import annotations

import sys
import types
from concurrent.futures import ThreadPoolExecutor

import fake_pycuda
import numpy as np
import pytest

from runtime.engines import TensorRTRunner, close_runners
from runtime.errors import EngineUnavailable

MAX_BATCH = 16


def _fake_tensorrt(driver: fake_pycuda.FakeDriver) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}
            self.shape: tuple[int, ...] = ()
            self.profile = -1

        def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
            self.profile = profile
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            assert name == "x"
            self.shape = tuple(shape)
            return 1 <= shape[0] <= MAX_BATCH

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self.shape if name == "z" else ()

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream: int) -> bool:
            driver.need_context("cuLaunchKernel")  # TensorRT launches in the current context
            count = int(np.prod(self.shape))
            x = driver.view(self.addresses["x"], count, np.float32)
            driver.view(self.addresses["z"], count, np.float32)[:] = 2 * x
            return True

    class Engine:
        num_io_tensors = 2
        num_optimization_profiles = 2

        def get_tensor_name(self, i: int) -> str:
            return ("x", "z")[i]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine() if plan == b"plan" else None

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> fake_pycuda.FakeDriver:
    driver = fake_pycuda.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(driver))
    return driver


def test_a_runner_built_and_run_on_worker_threads_reuses_its_buffers(driver) -> None:
    """Workers are built and run on executor threads, where pycuda has no current context
    of its own; staging and device buffers are made once per size, never per call."""
    rng = np.random.default_rng(0)
    with ThreadPoolExecutor(2, thread_name_prefix="worker") as pool:
        runner = pool.submit(TensorRTRunner, b"plan", "engines/sm90/f.plan", 3, "x", "z").result()
        assert runner.context.profile == 1  # worker 3 of a two-profile plan
        for batch in (4, 4, 2, 4):
            x = rng.standard_normal((batch, 1, 3, 3)).astype(np.float32)
            y = pool.submit(runner.run, x).result()
            np.testing.assert_allclose(y, 2 * x, rtol=1e-6)
        assert len(driver.live) == 2 and driver.pinned_made == 2  # one input, one output buffer
        x = rng.standard_normal((MAX_BATCH, 1, 3, 3)).astype(np.float32)  # grows them once
        np.testing.assert_allclose(pool.submit(runner.run, x).result(), 2 * x, rtol=1e-6)
        assert len(driver.live) == 2 and driver.pinned_live == 2 and driver.pinned_made == 4
        first = pool.submit(runner.run, x[:1]).result()
        assert first.base is None or not isinstance(first.base, driver.HostAllocation)  # a copy
        pool.submit(close_runners, [runner]).result()  # the worker's stop(), on a pool thread
    assert driver.live == {} and driver.pinned_live == 0


def test_a_shape_outside_the_profile_and_a_bad_plan_fail_clearly(driver) -> None:
    runner = TensorRTRunner(b"plan", "f.plan", 0, "x", "z")
    with pytest.raises(EngineUnavailable, match="outside the plan's optimisation profile"):
        runner.run(np.zeros((MAX_BATCH + 1, 1, 3, 3), np.float32))
    runner.close()
    with pytest.raises(EngineUnavailable, match="could not deserialize the plan"):
        TensorRTRunner(b"other", "f.plan", 0, "x", "z")
