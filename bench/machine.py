"""Machine information recorded next to every benchmark figure.

A number without the machine it ran on cannot be compared with anything, so every bench
command stores `machine_info()` in its JSON record and `machine_label()` in its plot title.
Nothing here imports torch or CUDA libraries at module level: the GPU probe is lazy and a
missing driver simply yields `gpus: []`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Versions worth recording; a package that is not installed is recorded as null.
_PACKAGES = ("numpy", "onnxruntime", "onnx", "torch", "aiohttp", "uvloop", "tensorrt", "pycuda")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def usable_cpu_count() -> int:
    """CPUs this process may run on (affinity / cgroup cpuset), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_total_bytes() -> int | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024  # /proc/meminfo reports kB
    return None


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_info(timeout_s: float = 10.0) -> list[dict[str, str]]:
    """NVIDIA GPUs as reported by nvidia-smi; [] where there is none or it fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "name,memory.total,driver_version,compute_cap"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi present but failed (%s); recording no GPU", exc)
        return []
    gpus = []
    for line in out.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 4:
            gpus.append(dict(zip(("name", "memory", "driver", "compute_cap"), fields, strict=True)))
    return gpus


def git_commit(repo: Path | None = None) -> str | None:
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> tuple[float, float, float] | None:
    """1/5/15-minute load average: shows whether other jobs shared the CPUs during a run."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """JSON-safe description of this machine and software stack, for every bench record."""
    mem = memory_total_bytes()
    load = load_average()
    return {
        "hostname": socket.gethostname(),
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count_usable": usable_cpu_count(),
        "cpu_count_host": os.cpu_count(),
        "memory_gib": None if mem is None else round(mem / 2**30, 1),
        "load_average": None if load is None else [round(v, 2) for v in load],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "gpus": gpu_info(),
        "git_commit": git_commit(),
    }


def machine_label(info: dict[str, Any]) -> str:
    """One short line for plot titles: CPU model, cores, GPU if any."""
    label = f"{info['cpu_model']}, {info['cpu_count_usable']} cores"
    if info.get("gpus"):
        label += f", {info['gpus'][0]['name']}"
    return label
