"""Coded decoding on the GPU: kernels.cuda_decoder.CudaOnlineDecoder on the device tensors
that the torch engine's workers return (`--engine torch --device cuda --mode coded`).

Ordering is by events, never by accident:
- a worker leaves its result on the device as a `DeviceResult`: the tensor and an event
  recorded on the worker's stream after the kernels that wrote it;
- the decoder's stream waits on that event before its fused kernel reads the tensor, and
  the tensor is recorded on the decoder's stream (`record_stream`), so torch's caching
  allocator never hands its memory to the worker's next call while a decode still reads
  it (this covers a group that turns out undecodable, whose queued kernels are abandoned);
- the k decoded embeddings are copied to pinned host memory on the decoder's stream, and
  that copy's event is awaited on a waiter thread, never on the event loop.
Decoders are persistent (`DeviceDecoders`, one free list per result shape): a decoder owns
a stream, an fp32 estimate, a device output and a pinned host copy, all made once, because
cuMemAlloc / cuMemFree and stream creation synchronise the whole device (every worker
stream) if done per group.

torch and pycuda are imported lazily here, and `make_device_decoders` falls back to host
decoding (with a warning) where the CUDA decoder cannot load, e.g. without nvcc.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.coding import CodingScheme

logger = logging.getLogger(__name__)

WAITER_THREADS = 2  # device waits in flight at once (one per concurrent dispatch is plenty)


@dataclass(frozen=True)
class DeviceResult:
    """A worker's output left on the GPU: a contiguous CUDA tensor and the event recorded on
    the worker's stream once the kernels writing it were queued."""

    tensor: Any  # torch.Tensor on CUDA
    event: Any  # torch.cuda.Event


class DeviceDecoder:
    """One persistent decoder for one result shape (kernels.coding.OnlineDecoder's add /
    received / missing); DeviceDecoders hands it out one group at a time."""

    def __init__(self, scheme: CodingScheme, shape: tuple[int, ...], kernels: Any, torch: Any) -> None:
        from kernels.cuda_decoder import CudaOnlineDecoder

        self.scheme = scheme
        self.shape = tuple(shape)
        self._torch = torch
        self._out = torch.empty((scheme.k, *shape), device="cuda", dtype=torch.float32)
        self._decoder = CudaOnlineDecoder(scheme, shape, out=self._out, kernels=kernels)
        # the pycuda stream the kernels run on, as torch sees it (same CUstream)
        self.stream = torch.cuda.ExternalStream(self._decoder.stream_handle)
        self._host = torch.empty((scheme.k, *shape), dtype=torch.float32, pin_memory=True)
        # blocking: the waiter thread sleeps in cudaEventSynchronize instead of spinning a core
        self._copied = torch.cuda.Event(blocking=True)

    @property
    def received(self) -> tuple[int, ...]:
        return tuple(self._decoder.planner.received)

    @property
    def missing(self) -> tuple[int, ...]:
        got = set(self.received)
        return tuple(j for j in range(self.scheme.k) if j not in got)

    def reset(self) -> None:
        self._decoder.reset()

    def add(self, index: int, value: DeviceResult) -> bool:
        tensor = value.tensor
        self.stream.wait_event(value.event)  # device-side: after the worker's kernels
        tensor.record_stream(self.stream)  # its memory is not reused before our reads
        return bool(self._decoder.add(index, tensor))

    def start_copy(self) -> Any:
        """Queue the copy of the (k, *shape) answer to pinned host memory; its event."""
        self._decoder.finalize()  # raises CodingError unless k results are in
        with self._torch.cuda.stream(self.stream):
            self._host.copy_(self._out, non_blocking=True)
        self._copied.record(self.stream)
        return self._copied

    def host_result(self) -> np.ndarray:
        """The pinned answer as numpy: valid until this decoder is released."""
        return self._host.numpy()


class DeviceDecoders:
    """runtime.decoders.Decoders on the GPU: persistent DeviceDecoders per shape."""

    def __init__(self, make: Callable[[tuple[int, ...]], Any], waiter: ThreadPoolExecutor | None = None) -> None:
        """`make(shape)` builds a decoder with reset / start_copy / host_result (DeviceDecoder)."""
        self._make = make
        self._free: dict[tuple[int, ...], list[Any]] = defaultdict(list)
        self._waiter = waiter or ThreadPoolExecutor(WAITER_THREADS, thread_name_prefix="coded-gpu-wait")
        self.built = 0  # decoders ever made (bounded by shapes x concurrent dispatches)

    def acquire(self, shape: tuple[int, ...]) -> Any:
        free = self._free[tuple(shape)]
        if free:
            decoder = free.pop()
            decoder.reset()
            return decoder
        self.built += 1
        return self._make(tuple(shape))

    async def finalize(self, decoder: Any) -> np.ndarray:
        event = decoder.start_copy()
        await asyncio.get_running_loop().run_in_executor(self._waiter, event.synchronize)
        return decoder.host_result()

    def release(self, decoder: Any) -> None:
        """Back on the free list. Whatever it still has queued runs on its own stream before
        the next group's work, so nothing needs to wait here."""
        self._free[decoder.shape].append(decoder)

    def close(self) -> None:
        self._waiter.shutdown(wait=False, cancel_futures=True)


def make_device_decoders(scheme: CodingScheme) -> DeviceDecoders | None:
    """Decoders on the GPU, or None when the CUDA decoder is unavailable."""
    try:
        import torch

        from kernels.cuda_kernels import load_kernels

        kernels = load_kernels()
    except Exception as exc:  # noqa: BLE001 - any failure means "decode on the host"
        logger.warning("CUDA decoder unavailable (%s: %s); decoding on the host instead", type(exc).__name__, exc)
        return None
    logger.info("decoding on the GPU with kernels.cuda_decoder")
    return DeviceDecoders(lambda shape: DeviceDecoder(scheme, shape, kernels, torch))


def to_host(value: Any) -> np.ndarray:
    """A worker result as a numpy array (a DeviceResult is waited for and copied)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, DeviceResult):
        value.event.synchronize()
        return value.tensor.cpu().numpy()
    return value.detach().cpu().numpy()
