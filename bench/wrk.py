"""Drive a KServe v2 `/infer` endpoint with wrk, the external C load generator.

Why wrk: a Python client on the same 2 cores costs more CPU per request than the server it
measures, so its ceiling, not the server's, would be the number. wrk (Debian package `wrk`,
4.1) sends one prepared body over `connections` keep-alive connections from `threads`
threads; bench/wrk/infer.lua loads the body and prints a `WRK_JSON {...}` line at the end
that `parse_wrk_output` reads.

Bodies (`make_body`) carry real images (bench/soakload.py `load_images`: the bundle's test
split, else seeded random): `binary` is the KServe v2 binary-tensor extension (JSON header,
then the raw UINT8 bytes, with `Inference-Header-Content-Length`); `json` puts the pixels in
the `data` list. Neither names outputs, so every server answers its default outputs as JSON.

`run_wrk` fails loudly (`WrkError`) on any answer with status >= 400 or any socket error
(connect, read, write, timeout): a throughput with errors in it is not a throughput.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError

SCRIPT = Path(__file__).resolve().parent / "wrk" / "infer.lua"
BODY_KINDS = ("binary", "json")
MARKER = "WRK_JSON "
ERROR_KEYS = ("errors_connect", "errors_read", "errors_write", "errors_timeout", "errors_status")
SETUP_HINT = "install it with `bash bench/setup_peers.sh` (apt-get install -y wrk)"


class WrkError(BenchError, RuntimeError):
    """wrk is missing, failed, printed no result, or saw errors."""


@dataclass(frozen=True)
class Body:
    """One request body and what wrk must send with it."""

    kind: str  # "binary" or "json"
    data: bytes
    header_length: int  # bytes of the JSON header (binary); 0 = a plain JSON body
    batch: int  # images in the request

    def headers(self) -> dict[str, str]:
        """The HTTP headers infer.lua sends with this body (for clients other than wrk)."""
        if self.header_length:
            return {"Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(self.header_length)}
        return {"Content-Type": "application/json"}


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] < 1:
        raise WrkError(f"request images must be uint8 [B, C, H, W] with B >= 1, got {images.dtype} "
                       f"{list(images.shape)}")


def binary_body(input_name: str, images: np.ndarray) -> Body:
    """KServe v2 binary-tensor body: JSON header, then the UINT8 pixels [B, C, H, W] as bytes."""
    _check_images(images)
    raw = np.ascontiguousarray(images).tobytes()
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(images.shape), "datatype": "UINT8",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return Body("binary", header + raw, len(header), int(images.shape[0]))


def json_body(input_name: str, images: np.ndarray) -> Body:
    """KServe v2 JSON body: the UINT8 pixels [B, C, H, W] flattened into `data`."""
    _check_images(images)
    body = json.dumps({"inputs": [{"name": input_name, "shape": list(images.shape), "datatype": "UINT8",
                                   "data": images.reshape(-1).tolist()}]}).encode()
    return Body("json", body, 0, int(images.shape[0]))


def make_body(kind: str, input_name: str, images: np.ndarray) -> Body:
    if kind not in BODY_KINDS:
        raise WrkError(f"body kind must be one of {BODY_KINDS}, got {kind!r}")
    return binary_body(input_name, images) if kind == "binary" else json_body(input_name, images)


def infer_url(server_url: str, model_name: str) -> str:
    return f"{server_url.rstrip('/')}/v2/models/{model_name}/infer"


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured (latencies of every answered request, in ms)."""

    requests: int
    duration_s: float
    bytes_read: int
    errors: dict[str, int]
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    client_cpu_s: float | None = None  # wrk's user + system CPU seconds, when measured

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "requests_per_s": self.requests_per_s}


def parse_wrk_output(stdout: str) -> WrkResult:
    """The `WRK_JSON {...}` line infer.lua prints -> WrkResult (WrkError when absent or bad)."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if len(lines) != 1:
        raise WrkError(f"expected one {MARKER.strip()} line in wrk's output, found {len(lines)}; "
                       f"output tail:\n{stdout[-2000:]}")
    try:
        d = json.loads(lines[0][len(MARKER):])
        return WrkResult(requests=int(d["requests"]), duration_s=int(d["duration_us"]) / 1e6,
                         bytes_read=int(d.get("bytes", 0)), errors={k: int(d[k]) for k in ERROR_KEYS},
                         mean_ms=float(d.get("mean_us", float("nan"))) / 1e3, p50_ms=int(d["p50_us"]) / 1e3,
                         p90_ms=int(d["p90_us"]) / 1e3, p99_ms=int(d["p99_us"]) / 1e3,
                         max_ms=int(d["max_us"]) / 1e3)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WrkError(f"malformed {MARKER.strip()} line ({type(exc).__name__}: {exc}): {lines[0][:300]}") from exc


def check_result(result: WrkResult, url: str) -> WrkResult:
    """Raise WrkError on any non-2xx answer or socket error, or when nothing was answered."""
    bad = {k: v for k, v in result.errors.items() if v}
    if bad:
        raise WrkError(f"wrk against {url}: {result.requests} requests with errors {bad} (errors_status: "
                       "answers with status >= 400; the others are socket errors); see the server log")
    if result.requests == 0:
        raise WrkError(f"wrk against {url}: no request was answered in {result.duration_s:.1f} s")
    return result


def wrk_path() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        raise WrkError(f"wrk not found on PATH; {SETUP_HINT}")
    return exe


def wrk_command(url: str, body_path: Path, header_length: int, connections: int, duration_s: int,
                threads: int = 1, timeout_s: int = 10) -> list[str]:
    """wrk takes whole seconds for -d and --timeout; connections must be >= threads."""
    if connections < threads or threads < 1 or duration_s < 1 or timeout_s < 1:
        raise WrkError(f"wrk needs threads >= 1, connections >= threads, duration and timeout >= 1 s; got "
                       f"threads={threads}, connections={connections}, duration={duration_s}, timeout={timeout_s}")
    return [wrk_path(), "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s",
            "--timeout", f"{timeout_s}s", "-s", str(SCRIPT), url, "--", str(body_path), str(header_length)]


def run_wrk(url: str, body: Body, work_dir: Path, connections: int = 16, duration_s: int = 10,
            threads: int = 1, timeout_s: int = 10) -> WrkResult:
    """One wrk run of `body` against `url`; checked (see check_result). The body is written
    to `work_dir` because wrk's Lua reads it from a file. Also records wrk's CPU seconds
    (from this process's reaped-children usage), so a report can say what the client cost."""
    work_dir.mkdir(parents=True, exist_ok=True)
    body_path = work_dir / f"body-{body.kind}-b{body.batch}.bin"
    body_path.write_bytes(body.data)
    argv = wrk_command(url, body_path, body.header_length, connections, duration_s, threads, timeout_s)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 2 * timeout_s + 30)
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        raise WrkError(f"wrk against {url} did not finish in {duration_s + 2 * timeout_s + 30} s") from exc
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise WrkError(f"wrk exited with code {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = parse_wrk_output(done.stdout)
    return check_result(WrkResult(**{**asdict(result), "client_cpu_s": round(cpu_s, 3)}), url)
