"""The engine without any protocol: start, admit + infer, health, statistics, drain, stop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from runtime_harness import TinyModel, random_images, server_config

from runtime.engine import Engine
from runtime.errors import ServiceUnavailable
from runtime.manifest import RECONSTRUCTED_OUTPUT, class_output, logits_output


def test_engine_answers_without_a_server(tiny: TinyModel) -> None:
    images = random_images(4, seed=11)  # two full groups of k = 2: one dispatch
    reference = tiny.logits(images)

    async def run() -> tuple[dict, dict, list[bool]]:
        # no re-dispatch: a straggler deadline passing before the parity lands would re-send
        # slot 0 and answer it exactly, and this test checks the decoded flags
        engine = Engine(server_config(tiny.bundle, fault_kill_worker=0, fault_kill_after_calls=0,
                                      redispatch=False))
        ready = [engine.health().ready]
        with pytest.raises(ServiceUnavailable, match="warming up"):
            async with engine.admit():
                pass
        await engine.start()
        ready.append(engine.health().ready)
        try:
            async with engine.admit() as admission:
                result = await engine.infer(admission, images)
        finally:
            engine.begin_drain()
            ready.append(engine.health().ready)
            assert await engine.drain(1.0)
            await engine.stop()
        return result.tensors, engine.statistics(), ready

    tensors, stats, ready = asyncio.run(run())
    assert ready == [False, True, False]
    for task in ("digit", "parity"):
        np.testing.assert_allclose(tensors[logits_output(task)], reference[task], atol=1e-3)
        np.testing.assert_array_equal(tensors[class_output(task)], reference[task].argmax(axis=1))
    flags = tensors[RECONSTRUCTED_OUTPUT]
    # worker 0 dies on its first call: slot 0 of both groups (queries 0 and 2) is decoded
    assert flags.tolist() == [True, False, True, False]
    assert stats["inference_count"] == 4 and stats["reconstructed"] == 2


def test_engine_runs_one_dispatch_per_compute_thread_unless_told(tiny: TinyModel) -> None:
    async def run(**overrides: int) -> tuple[int, int]:
        engine = Engine(server_config(tiny.bundle, **overrides))
        await engine.start()
        try:
            assert engine.scheduler is not None
            return engine.scheduler.max_inflight_groups, engine.threads
        finally:
            await engine.stop()

    inflight, threads = asyncio.run(run())
    assert inflight == threads
    assert asyncio.run(run(max_inflight_groups=3))[0] == 3


def test_infer_needs_a_live_admission(tiny: TinyModel) -> None:
    async def run() -> None:
        engine = Engine(server_config(tiny.bundle))
        await engine.start()
        try:
            async with engine.admit() as admission:
                pass
            with pytest.raises(RuntimeError, match="admission"):
                await engine.infer(admission, random_images(1, seed=0))
        finally:
            await engine.stop()

    asyncio.run(run())
