"""runtime.gpu_decode's pool rules on CPU (fake decoders): decoders persist per shape and the
device wait happens on a waiter thread, never on the event loop. The CUDA decoder itself runs
in tests/runtime/test_gpu_serving.py (gpu)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from runtime.gpu_decode import DeviceDecoders


class FakeEvent:
    def __init__(self) -> None:
        self.waited_on: str | None = None

    def synchronize(self) -> None:
        self.waited_on = threading.current_thread().name


class FakeDecoder:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape, self.resets, self.event = shape, 0, FakeEvent()
        self.answer = np.full((2, *shape), len(shape), np.float32)

    def reset(self) -> None:
        self.resets += 1

    def start_copy(self) -> FakeEvent:
        return self.event

    def host_result(self) -> np.ndarray:
        return self.answer


@pytest.mark.asyncio
async def test_decoders_persist_per_shape_and_are_reset_when_reused() -> None:
    pool = DeviceDecoders(FakeDecoder)
    try:
        a, b = pool.acquire((4, 3)), pool.acquire((4, 3))  # two dispatches at once
        c = pool.acquire((1, 3))
        assert pool.built == 3 and a is not b
        pool.release(a)
        assert pool.acquire((1, 3)) is not a  # another shape: its own decoder
        assert pool.acquire((4, 3)) is a and a.resets == 1  # the same buffers, next group
        pool.release(b)
        pool.release(c)
        assert pool.acquire((4, 3)) is b and pool.built == 4
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_the_device_wait_runs_off_the_event_loop() -> None:
    pool = DeviceDecoders(FakeDecoder)
    try:
        decoder = pool.acquire((2,))
        result = await pool.finalize(decoder)
        assert result is decoder.answer
        assert decoder.event.waited_on is not None
        assert decoder.event.waited_on != threading.current_thread().name
        assert decoder.event.waited_on.startswith("coded-gpu-wait")
        assert asyncio.get_running_loop().is_running()
    finally:
        pool.close()
