"""Coded decoding on the GPU: kernels.cuda_decoder.CudaOnlineDecoder on the device tensors
that the torch engine's workers return (`--engine torch --device cuda --mode coded`).

`DeviceDecoder` has kernels.coding.OnlineDecoder's interface (add / received / missing /
finalize), so CodedMode uses either one unchanged. Worker results stay on the device:
each arrival is folded in by one fused kernel on the decoder's stream, and only the k
decoded embeddings are copied to the host, for the heads. torch and pycuda are imported
lazily here, and `make_device_decoders` falls back to host decoding (with a warning) where
the CUDA decoder cannot load, e.g. without nvcc. Not run on this project's CPU machines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kernels.coding import CodingScheme

logger = logging.getLogger(__name__)


class DeviceDecoder:
    def __init__(self, scheme: CodingScheme, shape: tuple[int, ...], kernels: Any,
                 torch: Any) -> None:
        from kernels.cuda_decoder import CudaOnlineDecoder

        self.scheme = scheme
        self._torch = torch
        self._out = torch.empty((scheme.k, *shape), device="cuda", dtype=torch.float32)
        self._decoder = CudaOnlineDecoder(scheme, shape, out=self._out, kernels=kernels)

    @property
    def received(self) -> tuple[int, ...]:
        return tuple(self._decoder.planner.received)

    @property
    def missing(self) -> tuple[int, ...]:
        got = set(self.received)
        return tuple(j for j in range(self.scheme.k) if j not in got)

    def add(self, index: int, value: Any) -> bool:
        """value: a contiguous float32 CUDA tensor of `shape` (the worker synchronised its
        stream before returning it, so the decoder's stream may read it)."""
        return bool(self._decoder.add(index, value.contiguous()))

    def finalize(self) -> np.ndarray:
        """(k, *shape) on the host; waits for the decoder's kernels."""
        self._decoder.finalize()
        self._decoder.synchronize()
        return self._out.cpu().numpy()


def make_device_decoders(scheme: CodingScheme) -> Callable[[tuple[int, ...]], Any] | None:
    """A factory shape -> DeviceDecoder, or None when the CUDA decoder is unavailable."""
    try:
        import torch

        from kernels.cuda_kernels import load_kernels

        kernels = load_kernels()
    except Exception as exc:  # noqa: BLE001 - any failure means "decode on the host"
        logger.warning("CUDA decoder unavailable (%s: %s); decoding on the host instead",
                       type(exc).__name__, exc)
        return None
    logger.info("decoding on the GPU with kernels.cuda_decoder")
    return lambda shape: DeviceDecoder(scheme, shape, kernels, torch)


def to_host(value: Any) -> np.ndarray:
    """A worker result as a numpy array (torch CUDA tensors are copied to the host)."""
    if isinstance(value, np.ndarray):
        return value
    return value.detach().cpu().numpy()
