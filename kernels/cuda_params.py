"""Host images of decoder.cu's kernel parameter structs (decoder.cu pins them with static_asserts).

Each kernel takes one struct by value; these pack it byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from kernels.errors import CodingError
from kernels.reference import MAX_INPUTS, MAX_OUTPUTS

ONE_SHOT_PARAMS = struct.Struct(f"<{MAX_INPUTS}QQQqfi")  # inputs, parity, out, n, scale, m
ONLINE_UPDATE_PARAMS = struct.Struct("<QQQQqfffi")  # est, x, copy_out, final_out, n, alpha, beta, scale, pad
_GENERAL_HEAD = struct.Struct(f"<{MAX_INPUTS}Q{MAX_OUTPUTS}Q")  # inputs, outputs
_GENERAL_TAIL = struct.Struct("<qii")  # n, num_inputs, num_outputs
GENERAL_PARAMS_SIZE = _GENERAL_HEAD.size + 4 * MAX_OUTPUTS * MAX_INPUTS + _GENERAL_TAIL.size
SPIN_WAIT_PARAMS = struct.Struct("<q")  # duration_ns


def pack_one_shot(inputs: Sequence[int], parity: int, out: int, n: int, parity_scale: float) -> bytes:
    if len(inputs) > MAX_INPUTS:
        raise CodingError(f"one_shot_decode takes at most {MAX_INPUTS} inputs, got {len(inputs)}")
    pointers = list(inputs) + [0] * (MAX_INPUTS - len(inputs))
    return ONE_SHOT_PARAMS.pack(*pointers, parity, out, n, parity_scale, len(inputs))


def pack_online_update(
    est: int, x: int, n: int, alpha: float, beta: float, copy_out: int, final_out: int, final_scale: float
) -> bytes:
    return ONLINE_UPDATE_PARAMS.pack(est, x, copy_out, final_out, n, alpha, beta, final_scale, 0)


def pack_general(coeffs: np.ndarray, inputs: Sequence[int], outputs: Sequence[int], n: int) -> bytes:
    rows, cols = coeffs.shape
    if cols != len(inputs) or not 1 <= cols <= MAX_INPUTS:
        raise CodingError(f"general_decode: coeffs {coeffs.shape} for {len(inputs)} inputs (1..{MAX_INPUTS})")
    if rows != len(outputs) or not 1 <= rows <= MAX_OUTPUTS:
        raise CodingError(f"general_decode: {rows} coefficient rows for {len(outputs)} outputs per launch")
    table = np.zeros((MAX_OUTPUTS, MAX_INPUTS), dtype="<f4")  # rows >= R must be zero: see decoder.cu
    table[:rows, :cols] = coeffs
    head = _GENERAL_HEAD.pack(*inputs, *([0] * (MAX_INPUTS - cols)), *outputs, *([0] * (MAX_OUTPUTS - rows)))
    return head + table.tobytes() + _GENERAL_TAIL.pack(n, cols, rows)
