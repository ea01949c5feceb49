"""decoder.cu's kernels compiled for the host, so CI checks the real kernel source on CPUs.

  twin = load_twin()                              # g++ builds it once into the kernel cache
  twin.launch("ci_one_shot_decode_f32", grid=3, block=256, params=pack_one_shot(...))

A small shim (twin_src/cuda_shim.h, with stand-ins for cuda_fp16.h / cuda_bf16.h) defines what
the kernels take from CUDA: the launch indices, float4 / uint4, __half / __nv_bfloat16 with
round-to-nearest-even conversions, __ldg (which also records misaligned vector loads: a GPU
faults on them, x86 would not), fmaf. twin_src/twin.cpp includes decoder.cu as it
is (only ci_spin_wait, PTX timer code, is left out) and loops each launch over its grid, one
(block, thread) at a time: every kernel is an elementwise grid-stride loop with no shared
memory or barriers, so that order computes what any GPU schedule computes. Launches take
the bytes kernels.cuda_params packs for the GPU and pointers into host memory, so the struct
layouts (decoder.cu's static_asserts hold on x86-64 as on the device), the index math, the
16-byte and scalar paths, the tails and the 16-bit conversions are tested on every commit.

What the twin cannot check: nvcc's code generation (it contracts a*b+c into FMAs where the
host build does not: -ffp-contract=off keeps the twin bit-identical to kernels.reference),
register limits, timing and memory ordering between streams. Those need the GPU check
(bench/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

from kernels.build import SOURCE, compile_atomically, default_cache_dir, tool_version
from kernels.errors import KernelBuildError, KernelsError

logger = logging.getLogger(__name__)

TWIN_DIR = Path(__file__).with_name("twin_src")
TWIN_SOURCES: tuple[Path, ...] = (
    SOURCE,
    TWIN_DIR / "twin.cpp",
    TWIN_DIR / "cuda_shim.h",
    TWIN_DIR / "include" / "cuda_fp16.h",
    TWIN_DIR / "include" / "cuda_bf16.h",
)
CXX_ENV = "CXX"
# -fno-strict-aliasing: the kernels reinterpret uint4 as __half2 (fine in CUDA, UB for g++'s
# optimiser otherwise); -ffp-contract=off: no FMA where the source wrote a*b+c.
CXX_FLAGS: tuple[str, ...] = (
    "-std=c++17", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off",
    "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
)


def find_compiler(cxx: str | None = None) -> str:
    """The C++ compiler to use ($CXX, then g++, then c++), or KernelBuildError naming the fix."""
    for candidate in ([cxx] if cxx else [os.environ.get(CXX_ENV), "g++", "c++"]):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    raise KernelBuildError(
        f"no C++ compiler for the host twin of the kernels (looked for {cxx or f'${CXX_ENV}, g++, c++'}): "
        "install g++ (Debian: apt-get install g++) or set $CXX"
    )


def twin_path(cxx: str, cache_dir: str | Path | None = None) -> Path:
    """Where the twin for these sources, this compiler and these flags lives (may not exist yet)."""
    digest = hashlib.sha256()
    for source in TWIN_SOURCES:
        digest.update(source.read_bytes())
    digest.update(tool_version(cxx).encode())
    digest.update(" ".join(CXX_FLAGS).encode())
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache / f"decoder-host-twin-{digest.hexdigest()[:20]}.so"


def build_twin(cxx: str | None = None, cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The cached shared library of the twin, compiled first when missing (about a second)."""
    compiler = find_compiler(cxx)
    target = twin_path(compiler, cache_dir)
    if target.is_file() and not force:
        return target
    logger.info("kernels: compiling the host twin of %s with %s", SOURCE.name, compiler)
    command = [compiler, *CXX_FLAGS, f"-I{TWIN_DIR / 'include'}", str(TWIN_DIR / "twin.cpp")]
    compile_atomically(command, target, Path(compiler).name)
    return target


class HostTwin:
    """The loaded twin: launch(name, grid, block, params) runs one kernel on host memory."""

    def __init__(self, library: str | Path) -> None:
        self.path = Path(library)
        self._lib = ctypes.CDLL(str(self.path))
        self._launch = self._lib.ci_twin_launch
        self._launch.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_longlong, ctypes.c_uint, ctypes.c_uint]
        self._launch.restype = ctypes.c_int
        self._param_bytes = self._lib.ci_twin_param_bytes
        self._param_bytes.argtypes = [ctypes.c_char_p]
        self._param_bytes.restype = ctypes.c_longlong

    def param_bytes(self, name: str) -> int:
        """Size of `name`'s parameter struct as the compiler laid it out (-1: no such kernel)."""
        return int(self._param_bytes(name.encode()))

    def launch(self, name: str, grid: int, block: int, params: bytes) -> None:
        """Run kernel `name` over grid x block threads. Every pointer in `params` must address
        live host memory of the size the kernel will touch: like a GPU, the twin trusts them."""
        if grid < 1 or block < 1:
            raise KernelsError(f"{name}: a launch needs grid >= 1 and block >= 1, got {grid} x {block}")
        status = self._launch(name.encode(), params, len(params), grid, block)  # the GIL is released
        if status == -1:
            raise KernelsError(f"the host twin has no kernel named {name!r}")
        if status == -2:
            raise KernelsError(f"{name}: {len(params)} parameter bytes, its struct has {self.param_bytes(name)}")
        if status == -3:
            raise KernelsError(f"{name}: a vector load from a misaligned address (a GPU faults there)")


@functools.lru_cache(maxsize=1)
def load_twin() -> HostTwin:
    """The process-wide twin, built into the kernel cache ($CODED_INVNET_CACHE_DIR) on first use."""
    return HostTwin(build_twin())
