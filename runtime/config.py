"""`ServerConfig`: every server option, validated once; CLI flags map one-to-one onto fields."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError
from runtime.manifest import ManifestError, parse_code_label

ENGINES = ("onnxruntime", "torch", "tensorrt")
DEVICES = ("cpu", "cuda")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for tests and benchmarks only (flags in docs/ARCHITECTURE.md)."""

    delay_ms: float = 0.0  # added to a worker call's response time with probability delay_prob
    delay_prob: float = 0.0
    straggler_per_group: bool = False  # instead: exactly one of the first k workers per group
    fail_prob: float = 0.0  # a worker call raises
    kill_worker: int | None = None  # this worker dies once after kill_after_calls calls
    kill_after_calls: int | None = None
    kill_repeat: bool = False  # every incarnation of kill_worker dies after kill_after_calls
    kill_prob: float = 0.0  # any call kills its worker with this probability (soak tests)
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(self.delay_ms >= 0 and math.isfinite(self.delay_ms),
               f"--fault-delay-ms must be >= 0, got {self.delay_ms}")
        for name in ("delay_prob", "fail_prob", "kill_prob"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0,
                   f"--fault-{name.replace('_', '-')} must be in [0, 1], got {value}")
        _check((self.kill_worker is None) == (self.kill_after_calls is None),
               "--fault-kill-worker and --fault-kill-after-calls go together; got only one")
        _check(not self.kill_repeat or self.kill_worker is not None,
               "--fault-kill-repeat needs --fault-kill-worker and --fault-kill-after-calls")
        if self.kill_worker is not None:
            _check(self.kill_worker >= 0, f"--fault-kill-worker must be >= 0, got {self.kill_worker}")
            _check(self.kill_after_calls is not None and self.kill_after_calls >= 0,
                   f"--fault-kill-after-calls must be >= 0, got {self.kill_after_calls}")

    @property
    def active(self) -> bool:
        return bool(self.delay_prob and self.delay_ms) or self.straggler_per_group or bool(
            self.fail_prob) or self.kill_worker is not None or bool(self.kill_prob)


@dataclass(frozen=True)
class ServerConfig:
    bundle: str
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0 picks a free port (tests)
    metrics_port: int = 8002  # 0 picks a free port; -1 disables the metrics endpoint
    grpc_port: int = 8001  # KServe v2 gRPC; 0 picks a free port; -1 disables it
    workers: int = 0  # compute threads shared by all workers; 0 = min(n, cpu count)
    mode: str = "coded"  # a name in runtime.modes.MODES
    coding: str | None = None  # the bundle's code to serve, "N,K"; None = its first code
    workers_backend: str = "thread"  # a name in runtime.worker.BACKENDS
    ray_address: str | None = None  # ray backend: join this cluster; None = start a local one
    ray_num_cpus: float | None = None  # ray backend: CPUs per worker actor; None = auto
    # (min(1, cluster CPUs / n))
    ray_num_gpus: float = 0.0  # ray backend: GPUs per worker actor
    ray_max_restarts: int = -1  # ray backend: Ray restarts a dead actor this often (-1 = always)
    ray_start_timeout_s: float = 120.0  # ray backend: an actor (or the placement) not up
    # within this is a failed start
    engine: str = "onnxruntime"
    device: str = "cpu"
    encoders_on_workers: bool = False  # paper Remark 3: backup workers run their encoder
    systematic_grace_ms: float | None = None  # coded: once k results are in, wait this long
    # for missing systematic results (exact answers) before decoding; 0 = decode at once
    # (paper); None = learned: wait as long as such waits recently paid (runtime.deadlines)
    decode_wait_quantile: float = 0.99  # the learned wait's quantile of recent latenesses
    decode_wait_cap_ms: float = 5.0  # the learned decode wait never exceeds this
    straggler_scale: float = 2.0  # a call missing this many times later than its dispatch's
    # first result is a straggler: its dispatch frees its in-flight slot; 0 = never
    straggler_min_ms: float = 2.0  # ... and at least this long after the launch
    redispatch: bool = True  # coded: a group undecodable when its missing calls became
    # stragglers re-sends its missing systematic slots to workers that answered
    redispatch_copies: int = 2  # ... each to this many of them (one re-sent call straggles
    # as often as any call; two rarely both do)
    cancel_late_calls: bool = True  # a group's calls still running once it is answered are
    # cancelled (at once when unread, else after decode_wait_cap_ms): a worker skips them if
    # not yet started (Ray: ray.cancel)
    shadow_decode_fraction: float = 0.05  # coded, parm: of the groups with every exact
    # answer and a parity, rebuild one known answer off the request path and compare
    shadow_alert_below: float = 0.85  # warn (and set coded_shadow_alert) below this agreement
    shadow_window: int = 200  # compared answers per head in the running agreement
    frontend_inline_ms: float = 1.0  # frontend calls predicted faster run on the event loop
    max_queue_delay_ms: float = 2.0  # longest a query waits for its coding group to fill
    max_groups_per_call: int = 32  # complete queued groups batched into one worker call
    max_queue_size: int = 512  # queued queries; requests beyond wait (below), then 503
    admission_wait_ms: float = 5000.0  # a request finding the queue full waits this long for
    # room, its body unread, before 503 + Retry-After (0 = refuse at once)
    max_waiting_requests: int = 1024  # requests waiting for room at once; more get 503
    max_inflight_groups: int = 0  # dispatches executing at once; 0 = one per compute thread
    max_batch_size: int = 64  # queries in one request
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413
    worker_deadline_ms: float = 2000.0  # a worker call overdue by this is an erasure
    request_timeout_ms: float = 30000.0  # default when a request has no timeout parameter
    drain_timeout_s: float = 10.0  # graceful shutdown waits this long for in-flight work
    keepalive_timeout_s: float = 5.0  # an idle connection, or one whose request line and
    # headers have not all arrived this long after it opened or after its last response,
    # is closed (aiohttp runs one timer for both)
    read_timeout_s: float = 30.0  # a request body must arrive within this (else 408)
    large_body_bytes: int = 256 * 1024  # bodies above this are parsed in a helper process
    gpu_decode: bool = True  # coded + torch + cuda: decode on the device (kernels.cuda_decoder)
    verify_checksums: bool = True
    gc_freeze: bool = True  # `runtime serve`: once ready, the start-up heap leaves the cyclic
    # collector's scans (gc.freeze): a full collection under load paused serving 13-33 ms
    log_level: str = "INFO"
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        from runtime.modes import MODES  # the registries own the names (imported late:
        from runtime.worker import BACKENDS  # they import this module)

        _check(self.mode in MODES, f"--mode must be one of {tuple(MODES)}, got {self.mode!r}")
        _check(self.workers_backend in BACKENDS, f"--workers-backend must be one of "
               f"{tuple(BACKENDS)}, got {self.workers_backend!r}")
        if self.coding is not None:
            try:
                parse_code_label(self.coding)
            except ManifestError as exc:
                raise ConfigError(f"--coding: {exc}") from exc
        _check(self.engine in ENGINES, f"--engine must be one of {ENGINES}, got {self.engine!r}")
        _check(self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}")
        _check(not (self.engine == "onnxruntime" and self.device == "cuda"),
               "--engine onnxruntime runs on the CPU here; use --engine torch or tensorrt with "
               "--device cuda")
        _check(not (self.engine in ("torch", "tensorrt") and self.device == "cpu"),
               f"--engine {self.engine} is the GPU path; pass --device cuda")
        _check(0 <= self.http_port <= 65535, f"--http-port must be 0..65535, got {self.http_port}")
        _check(-1 <= self.metrics_port <= 65535,
               f"--metrics-port must be -1 (off) or 0..65535, got {self.metrics_port}")
        _check(-1 <= self.grpc_port <= 65535,
               f"--grpc-port must be -1 (off) or 0..65535, got {self.grpc_port}")
        _check(self.workers >= 0, f"--workers must be >= 0 (0 = auto), got {self.workers}")
        ray_flags = [f.name for f in dataclasses.fields(self)
                     if f.name.startswith("ray_") and getattr(self, f.name) != f.default]
        _check(self.workers_backend == "ray" or not ray_flags,
               f"{', '.join('--' + n.replace('_', '-') for n in ray_flags)} need(s) "
               "--workers-backend ray")
        _check(self.ray_num_cpus is None or (self.ray_num_cpus >= 0 and math.isfinite(self.ray_num_cpus)),
               f"--ray-num-cpus must be a finite number >= 0, got {self.ray_num_cpus}")
        _check(self.ray_num_gpus >= 0 and math.isfinite(self.ray_num_gpus),
               f"--ray-num-gpus must be a finite number >= 0, got {self.ray_num_gpus}")
        _check(not (self.ray_num_cpus == 0 and self.ray_num_gpus == 0),
               "--ray-num-cpus 0 needs --ray-num-gpus > 0: a worker actor must reserve something "
               "for its placement")
        _check(self.ray_max_restarts >= -1,
               f"--ray-max-restarts must be -1 (always) or >= 0, got {self.ray_max_restarts}")
        _check(self.ray_start_timeout_s > 0,
               f"--ray-start-timeout-s must be > 0, got {self.ray_start_timeout_s}")
        _check(self.max_inflight_groups >= 0,
               f"--max-inflight-groups must be >= 0 (0 = auto), got {self.max_inflight_groups}")
        for name in ("max_groups_per_call", "max_queue_size",
                     "max_batch_size", "max_body_bytes", "large_body_bytes",
                     "max_waiting_requests"):
            value = getattr(self, name)
            _check(value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
        _check(self.systematic_grace_ms is None or (
            self.systematic_grace_ms >= 0 and math.isfinite(self.systematic_grace_ms)),
            f"--systematic-grace-ms must be a finite number >= 0, got {self.systematic_grace_ms}")
        for name in ("shadow_decode_fraction", "shadow_alert_below"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        _check(self.shadow_window >= 1, f"--shadow-window must be >= 1, got {self.shadow_window}")
        _check(self.redispatch_copies >= 1,
               f"--redispatch-copies must be >= 1, got {self.redispatch_copies}")
        _check(0.0 < self.decode_wait_quantile <= 1.0,
               f"--decode-wait-quantile must be in (0, 1], got {self.decode_wait_quantile}")
        for name in ("max_queue_delay_ms", "decode_wait_cap_ms", "straggler_scale",
                     "straggler_min_ms", "frontend_inline_ms",
                     "worker_deadline_ms", "request_timeout_ms", "drain_timeout_s",
                     "keepalive_timeout_s", "read_timeout_s", "admission_wait_ms"):
            value = getattr(self, name)
            _check(value >= 0 and math.isfinite(value),
                   f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        _check(self.max_batch_size <= self.max_queue_size,
               f"--max-batch-size {self.max_batch_size} exceeds --max-queue-size "
               f"{self.max_queue_size}: a full-size request could never be queued; raise "
               "--max-queue-size or lower --max-batch-size")
        _check(self.keepalive_timeout_s > 0, "--keepalive-timeout-s must be > 0")
        _check(self.read_timeout_s > 0, "--read-timeout-s must be > 0")
        _check(self.worker_deadline_ms > 0, "--worker-deadline-ms must be > 0")
        _check(self.request_timeout_ms > 0, "--request-timeout-ms must be > 0")
        _check(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
               f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    @property
    def code(self) -> tuple[int, int] | None:
        """--coding as (n, k), or None for the bundle's first code."""
        return None if self.coding is None else parse_code_label(self.coding)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServerConfig:
        """Build from a flat mapping; `fault_*` keys fill `faults`. Unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"faults"}
        fault_fields = {f.name for f in dataclasses.fields(FaultConfig)}
        plain, faults, unknown = {}, {}, []
        for key, value in data.items():
            if key in fields:
                plain[key] = value
            elif key.startswith("fault_") and key[len("fault_"):] in fault_fields:
                faults[key[len("fault_"):]] = value
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"unknown server option(s) {sorted(unknown)}; known: {sorted(fields)} "
                              f"and fault_{{{','.join(sorted(fault_fields))}}}")
        return cls(**plain, faults=FaultConfig(**faults))
