"""The online decoder on the GPU: kernels.coding.OnlineDecoder on device pointers, one fused
kernel (kernels/decoder.cu) per arrival.

  decoder = CudaOnlineDecoder(scheme, (B, d), out=out_tensor)   # out: (k, B, d) on the GPU
  for index, result in arrivals:                 # torch CUDA tensors, CuPy arrays, raw pointers
      if decoder.add(index, result):             # one fused O(B*d) kernel per arrival
          break
  decoder.finalize(); decoder.synchronize()      # `out` now holds all k embeddings

Each decoder owns one stream, created once; kernels.cuda_kernels explains the context and
stream rules, kernels.cuda_driver the error checks.
"""

from __future__ import annotations

import math
from typing import Any

from kernels.coding import CodingScheme
from kernels.cuda_driver import ITEMSIZE, device_pointer, dtype_name
from kernels.cuda_kernels import CudaKernels, load_kernels
from kernels.errors import CodingError
from kernels.reference import CopyOp, DecodeOp, OnlinePlanner, UpdateOp

__all__ = ["CudaOnlineDecoder"]


class CudaOnlineDecoder:
    """kernels.coding.OnlineDecoder on device pointers: one fused kernel per arrival.

    `shape` is one result's shape (e.g. (B, C, H, W)); `out` is device memory for the
    (k, *shape) answer in `dtype` (allocated here when None; `.out_pointer` is its address).
    add(index, result) takes device memory of `shape` and `dtype` and returns True once, on
    the arrival that completes the group (its kernels are then queued on `.stream`).
    Results must stay alive until finalize(); the decoder keeps references to them.
    The plan (which kernel, which coefficients) is kernels.reference.OnlinePlanner's, shared
    with the numpy ReferenceOnlineDecoder.
    """

    def __init__(
        self,
        scheme: CodingScheme,
        shape: tuple[int, ...],
        *,
        out: Any = None,
        dtype: Any = "float32",
        stream: Any = None,
        kernels: CudaKernels | None = None,
    ) -> None:
        self.planner = OnlinePlanner(scheme)
        self.scheme = scheme
        self.shape = tuple(int(s) for s in shape)
        self.size = math.prod(self.shape)
        self.dtype = dtype_name(dtype)
        self.kernels = kernels or load_kernels()
        self.stream = stream if stream is not None else self.kernels.new_stream()  # created once
        self._row_bytes = self.size * ITEMSIZE[self.dtype]
        self._est = self.kernels.alloc(4 * self.size) if self.planner.online else None
        self._est_pointer = int(self._est) if self._est is not None else 0
        self._results: dict[int, tuple[Any, int]] = {}
        self._owned_out: Any = None
        self.set_output(out)

    @property
    def stream_handle(self) -> int:
        """Raw CUstream, for torch.cuda.ExternalStream / cupy.cuda.ExternalStream."""
        return int(self.stream.handle)

    @property
    def ready(self) -> bool:
        return self.planner.ready

    def set_output(self, out: Any) -> None:
        """Decode the next group into `out` ((k, *shape) device memory; None: our own buffer)."""
        nbytes = self.scheme.k * self._row_bytes
        if out is None:
            if self._owned_out is None:
                self._owned_out = self.kernels.alloc(nbytes)
            out = self._owned_out
        self.out = out
        self.out_pointer = device_pointer(out, nbytes=nbytes, dtype=self.dtype, what="out")

    def reset(self, out: Any = None) -> None:
        """Start the next coding group (optionally into a new `out`); buffers are reused."""
        self.planner.reset()
        self._results.clear()
        if out is not None:
            self.set_output(out)

    def _row(self, row: int) -> int:
        return self.out_pointer + row * self._row_bytes

    def add(self, index: int, value: Any) -> bool:
        index = self.planner.check_index(index)
        pointer = device_pointer(value, nbytes=self._row_bytes, dtype=self.dtype, what=f"result of worker {index}")
        accepted, ops = self.planner.add(index)
        if not accepted:
            return False
        self._results[index] = (value, pointer)  # keeps the caller's buffer alive
        for op in ops:
            self._run(op)
        return self.planner.ready

    def _run(self, op: UpdateOp | CopyOp | DecodeOp) -> None:
        kernels, n = self.kernels, self.size
        if isinstance(op, UpdateOp):
            kernels.prepare_online_update(
                self._est_pointer,
                self._results[op.source][1],
                n,
                op.alpha,
                op.beta,
                copy_out=None if op.copy_row is None else self._row(op.copy_row),
                final_out=None if op.final_row is None else self._row(op.final_row),
                final_scale=op.final_scale,
                dtype=self.dtype,
            )(self.stream)
        elif isinstance(op, CopyOp):
            kernels.copy(self._row(op.row), self._results[op.source][1], self._row_bytes, self.stream)
        else:
            inputs = [self._results[s][1] for s in op.sources]
            outputs = [self._row(r) for r in op.rows]
            for launch in kernels.prepare_general_decode(op.coeffs, inputs, outputs, n, self.dtype):
                launch(self.stream)

    def finalize(self) -> Any:
        """`out` (the object given, or our allocation); its kernels are queued on `.stream`."""
        if not self.planner.ready:
            raise CodingError(f"finalize needs k={self.scheme.k} distinct results, got {len(self.planner.received)}")
        return self.out

    def synchronize(self) -> None:
        self.kernels.synchronize(self.stream)
