"""One base for every kernels error; each keeps the builtin base its callers already catch."""

from __future__ import annotations

from kernels import errors


def test_every_kernels_error_has_one_base_and_keeps_its_builtin() -> None:
    builtin = {
        errors.CodingError: ValueError,
        errors.KernelConfigError: ValueError,
        errors.KernelBuildError: RuntimeError,
        errors.CudaDecoderError: RuntimeError,
        errors.CudaUnavailableError: errors.CudaDecoderError,
    }
    for error, base in builtin.items():
        assert issubclass(error, errors.KernelsError) and issubclass(error, base), error
    err = errors.CudaDecoderError("boom", routine="cuLaunchKernel", status="CUDA_ERROR_INVALID_VALUE")
    assert (str(err), err.routine, err.status) == ("boom", "cuLaunchKernel", "CUDA_ERROR_INVALID_VALUE")
