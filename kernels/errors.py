"""The kernels package's exceptions: one base class, one subclass per way a kernel call fails.

Each also keeps the builtin base callers already catch (`except ValueError` for bad codes and
arguments, `except RuntimeError` for CUDA and nvcc failures).
"""

from __future__ import annotations


class KernelsError(Exception):
    """Base class: a coding scheme, a decoder or the CUDA kernels could not do what was asked."""


class CodingError(KernelsError, ValueError):
    """A coding scheme, or the results handed to a decoder, are invalid."""


class KernelBuildError(KernelsError, RuntimeError):
    """nvcc is missing, or compiling the decoder kernels failed."""


class CudaDecoderError(KernelsError, RuntimeError):
    """A CUDA driver call failed; `routine` and `status` name the call and its CUresult."""

    def __init__(self, message: str, routine: str | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.routine = routine
        self.status = status


class CudaUnavailableError(CudaDecoderError):
    """pycuda is not installed, or no CUDA device / driver is usable."""


class KernelConfigError(KernelsError, ValueError):
    """A kernels config field (BuildConfig) or `python -m kernels build` flag is invalid."""
