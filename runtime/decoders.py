"""Where a coding group is decoded: the interface CodedMode uses, and the host decoders.

A mode asks `Decoders` for a decoder per dispatch (`acquire(shape)`), feeds it the worker
results as they land (`add(index, value) -> ready`), reads the answer with
`await finalize(decoder)` ((k, *shape) on the host, valid until the decoder is released) and
gives it back with `release(decoder)`, on every path, failed dispatches included. On the host
a decoder is a few numpy buffers, made per group; runtime.gpu_decode keeps persistent device
decoders instead, because there each one holds a stream and device buffers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kernels.coding import CodingScheme, OnlineDecoder


class Decoder(Protocol):
    """kernels.coding.OnlineDecoder's interface, as a mode drives it."""

    @property
    def received(self) -> tuple[int, ...]: ...

    @property
    def missing(self) -> tuple[int, ...]: ...

    def add(self, index: int, value: object) -> bool: ...


class Decoders(Protocol):
    def acquire(self, shape: tuple[int, ...]) -> Decoder: ...

    async def finalize(self, decoder: Decoder) -> np.ndarray: ...

    def release(self, decoder: Decoder) -> None: ...


class HostDecoders:
    """kernels.coding.OnlineDecoder on numpy results, a fresh one per group."""

    def __init__(self, scheme: CodingScheme) -> None:
        self.scheme = scheme

    def acquire(self, shape: tuple[int, ...]) -> OnlineDecoder:
        return OnlineDecoder(self.scheme, shape)

    async def finalize(self, decoder: OnlineDecoder) -> np.ndarray:
        return decoder.finalize()

    def release(self, decoder: OnlineDecoder) -> None:
        """Nothing to keep: numpy buffers are cheap to make."""
