"""Compile kernels/decoder.cu with nvcc into one cached fatbin (`python -m kernels build`).

The fatbin holds machine code for every GPU generation we deploy on (sm_80 A100, sm_86
consumer Ampere, sm_89 Ada/L4, sm_90 Hopper) plus compute_90 PTX, so a newer GPU can
JIT-compile it. It is built once, ahead of time by this command or lazily on first use by
`kernels.cuda_decoder`, and cached under a user cache directory in a file named by a hash of
the source, the nvcc version and the flags: editing the kernel or changing the toolkit
rebuilds, everything else reuses the file. Writes are atomic (temp file + rename), so
concurrent builders cannot leave a torn fatbin behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.configs import strict_from_dict
from kernels.errors import KernelBuildError, KernelConfigError, KernelsError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decoder.cu")
DEFAULT_ARCHS: tuple[str, ...] = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_PTX_ARCH = "compute_90"
CACHE_ENV = "CODED_INVNET_CACHE_DIR"
NVCC_ENV = "NVCC"
# Places nvcc lives when it is not on PATH (the CUDA images put it here).
_NVCC_FALLBACKS = ("/usr/local/cuda/bin/nvcc",)
_COMPILE_TIMEOUT_S = 600.0


@dataclass
class BuildConfig:
    """How to build the fatbin; every field is one `python -m kernels build` flag."""

    nvcc: str | None = None  # None: $NVCC, then `nvcc` on PATH, then /usr/local/cuda/bin/nvcc
    cache_dir: str | None = None  # None: $CODED_INVNET_CACHE_DIR or ~/.cache/coded-invnet/kernels
    archs: tuple[str, ...] = DEFAULT_ARCHS
    ptx_arch: str | None = DEFAULT_PTX_ARCH  # None: no PTX embedded
    force: bool = False
    verbose: bool = False  # log ptxas register / spill report

    def __post_init__(self) -> None:
        self.archs = tuple(self.archs)
        if not self.archs:
            raise KernelConfigError("BuildConfig.archs is empty: name at least one target such as 'sm_90'")
        for arch in self.archs:
            if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
                raise KernelConfigError(f"BuildConfig.archs: expected names like 'sm_90', got {arch!r}")
        if self.ptx_arch is not None and not (
            self.ptx_arch.startswith("compute_") and self.ptx_arch[8:].rstrip("a").isdigit()
        ):
            raise KernelConfigError(
                f"BuildConfig.ptx_arch: expected a name like 'compute_90' or None, got {self.ptx_arch!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BuildConfig:
        return strict_from_dict(cls, values, KernelConfigError)


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coded-invnet" / "kernels"


def find_nvcc(nvcc: str | None = None) -> str:
    """The nvcc to use, or KernelBuildError saying where we looked and how to fix it."""
    candidates = [nvcc] if nvcc else [os.environ.get(NVCC_ENV), "nvcc", *_NVCC_FALLBACKS]
    for candidate in candidates:
        if not candidate:
            continue
        found = shutil.which(candidate)
        if found:
            return found
    looked = nvcc if nvcc else f"${NVCC_ENV}, `nvcc` on PATH, {', '.join(_NVCC_FALLBACKS)}"
    raise KernelBuildError(
        f"nvcc not found (looked for {looked}). The CUDA decoder kernels need the CUDA toolkit's "
        "compiler: install it, put nvcc on PATH, set $NVCC, or pass --nvcc PATH. "
        "The numpy reference (kernels.reference) works without it."
    )


@functools.lru_cache(maxsize=8)
def tool_version(tool: str) -> str:
    """`TOOL --version` text (part of a cache key: a new compiler rebuilds)."""
    try:
        result = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise KernelBuildError(f"could not run {tool} --version: {exc}") from exc
    if result.returncode != 0:
        raise KernelBuildError(f"{tool} --version failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def nvcc_flags(config: BuildConfig) -> list[str]:
    # --threads 0: one nvcc thread per CPU across the gencode targets (4-5x faster builds).
    flags = ["-fatbin", "-O3", "-std=c++17", "--Werror", "all-warnings", "--threads", "0"]
    for arch in config.archs:
        flags += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    if config.ptx_arch is not None:
        flags += ["-gencode", f"arch={config.ptx_arch},code={config.ptx_arch}"]
    if config.verbose:
        flags += ["-Xptxas", "-v"]
    return flags


def cache_key(config: BuildConfig, nvcc: str, source: Path = SOURCE) -> str:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update(tool_version(nvcc).encode())
    # -Xptxas -v only changes the log, not the binary.
    digest.update(" ".join(f for f in nvcc_flags(dataclasses.replace(config, verbose=False))).encode())
    return digest.hexdigest()[:20]


def fatbin_path(config: BuildConfig | None = None, source: Path = SOURCE) -> Path:
    """Where the fatbin for this config lives (it may not exist yet)."""
    config = config or BuildConfig()
    nvcc = find_nvcc(config.nvcc)
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    return cache / f"{source.stem}-{cache_key(config, nvcc, source)}.fatbin"


def compile_atomically(command: list[str], target: Path, tool: str) -> subprocess.CompletedProcess[str]:
    """Run `command -o TMP` and move TMP onto `target` (temp file + rename: concurrent
    builders never leave a torn file); KernelBuildError with the compiler's message on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.stem, suffix=".tmp", dir=target.parent)
    os.close(fd)
    command = [*command, "-o", tmp_name]
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelBuildError(f"could not run {tool} ({' '.join(command)}): {exc}") from exc
        if result.returncode != 0:
            raise KernelBuildError(
                f"{tool} failed with exit code {result.returncode}.\ncommand: {' '.join(command)}\n"
                f"{(result.stderr or result.stdout)[-4000:]}"
            )
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return result


def build(config: BuildConfig | None = None, source: Path = SOURCE) -> Path:
    """Return the cached fatbin for `config`, compiling it first when missing (or forced)."""
    config = config or BuildConfig()
    nvcc = find_nvcc(config.nvcc)
    target = fatbin_path(config, source)
    if target.is_file() and not config.force:
        logger.debug("kernels: cached fatbin %s", target)
        return target
    logger.info("kernels: compiling %s for %s (+%s)", source.name, ",".join(config.archs), config.ptx_arch)
    result = compile_atomically([nvcc, *nvcc_flags(config), str(source)], target, "nvcc")
    if config.verbose and result.stderr:
        logger.info("ptxas report:\n%s", result.stderr.strip())
    logger.info("kernels: wrote %s (%d bytes)", target, target.stat().st_size)
    return target


_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: "compute", 2: "sm"}  # entry kind 1 = PTX, 2 = ELF (SASS)


def fatbin_contents(path: Path) -> list[str]:
    """Targets inside a fatbin, e.g. ['sm_80', ..., 'compute_90'] (PTX is named compute_XX).

    Layout (CUDA's fatbinary container): a 16-byte header (magic, version, header size,
    payload size), then entries, each a header (kind u16, flags u16, header size u32,
    payload size u64, ..., arch u32 at byte 28) followed by its payload.
    """
    data = Path(path).read_bytes()
    if len(data) < 16:
        raise KernelBuildError(f"{path} is not a fatbin: only {len(data)} bytes")
    magic, _version, header_size, payload_size = struct.unpack_from("<IHHQ", data, 0)
    if magic != _FATBIN_MAGIC:
        raise KernelBuildError(f"{path} is not a fatbin: magic {magic:#x}, expected {_FATBIN_MAGIC:#x}")
    targets, offset, end = [], header_size, min(len(data), header_size + payload_size)
    while offset + 32 <= end:
        kind, _flags, entry_header, entry_payload = struct.unpack_from("<HHIQ", data, offset)
        (arch,) = struct.unpack_from("<I", data, offset + 28)
        targets.append(f"{_FATBIN_KINDS.get(kind, f'kind{kind}')}_{arch}")
        offset += entry_header + entry_payload
    return targets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernels build", description=__doc__.splitlines()[0])
    parser.add_argument("--nvcc", default=None, help="nvcc to use (default: $NVCC, PATH, /usr/local/cuda)")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default: ${CACHE_ENV} or ~/.cache)")
    parser.add_argument(
        "--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated SASS targets (default: %(default)s)"
    )
    parser.add_argument("--ptx-arch", default=DEFAULT_PTX_ARCH, help="PTX to embed, or 'none' (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache holds the fatbin")
    parser.add_argument("--verbose", action="store_true", help="print ptxas's register and spill report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = BuildConfig(
            nvcc=args.nvcc,
            cache_dir=args.cache_dir,
            archs=tuple(a.strip() for a in args.archs.split(",") if a.strip()),
            ptx_arch=None if args.ptx_arch.lower() == "none" else args.ptx_arch,
            force=args.force,
            verbose=args.verbose,
        )
        path = build(config)
    except KernelsError as exc:
        logger.error("error: %s", exc)
        return 1
    logger.info("kernels: fatbin targets %s", ", ".join(fatbin_contents(path)))
    print(path)
    return 0
