"""`python -m kernels COMMAND ...`: build and inspect the CUDA online-decoder kernels."""

from __future__ import annotations

from kernels.commands import dispatch

COMMANDS = {
    "build": ("kernels.build", "compile the CUDA decoder kernels into a cached fatbin with nvcc"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m kernels", __doc__ or "", COMMANDS, argv)
