"""Prometheus metrics: Triton's names and labels, plus the coded-serving ones.

Triton exposes its counters without a `_total` suffix (nv_inference_request_success, ...).
prometheus-client appends `_total` to every Counter, so the Triton-named ones are
monotone Gauges here: same names, labels and values, a `gauge` TYPE line. Durations are
cumulative microseconds, as in Triton; divide by the matching count for a mean.
The runtime's own metrics are ordinary Counters/Histograms named `coded_*`.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MODEL_LABELS = ("model", "version")
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model: str, version: str = "1") -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "version": version}
        r = self.registry

        def triton(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, (*MODEL_LABELS, *extra), registry=r)

        self._success = triton("nv_inference_request_success", "Successful inference requests")
        self._failure = triton("nv_inference_request_failure", "Failed inference requests",
                               ("reason",))
        self._count = triton("nv_inference_count", "Queries (batch elements) inferred")
        self._exec_count = triton("nv_inference_exec_count", "Coding groups executed")
        self._request_us = triton("nv_inference_request_duration_us",
                                  "Cumulative end-to-end request handling time (us)")
        self._queue_us = triton("nv_inference_queue_duration_us",
                                "Cumulative time queries waited for their coding group (us)")
        self._compute_us = triton("nv_inference_compute_infer_duration_us",
                                  "Cumulative group execution time: encode, workers, decode, "
                                  "heads (us)")
        self._pending = triton("nv_inference_pending_request_count",
                               "Queries waiting in the batcher queue")
        self.inflight_requests = Gauge(
            "coded_inflight_requests", "Inference requests being handled (drained on shutdown)",
            MODEL_LABELS, registry=r)
        self.http_errors = Counter(
            "coded_http_errors", "HTTP error responses by status, including requests refused "
            "before any handler (bad framing, no route)", ("code",), registry=r)
        self.rejected = Counter(
            "coded_admission_rejected", "Requests refused (503) at admission, before their "
            "body was read, because the queue was full", MODEL_LABELS, registry=r)
        self.request_latency = Histogram(
            "coded_request_latency_seconds", "End-to-end latency of successful requests",
            MODEL_LABELS, buckets=LATENCY_BUCKETS_S, registry=r)
        self.reconstructed = Counter(
            "coded_reconstructed_responses", "Query answers decoded from coded results "
            "(their own worker's result was not used)", MODEL_LABELS, registry=r)
        self.erasures = Counter(
            "coded_erasures", "Worker results missing when a group was answered "
            "(straggling, failed or dead workers)", ("worker",), registry=r)
        self.late_dropped = Counter(
            "coded_late_results_dropped", "Worker results that arrived after their group "
            "was answered", ("worker",), registry=r)
        self.cancelled_calls = Counter(
            "coded_cancelled_calls", "Worker calls cancelled because their group was "
            "answered without them (--cancel-late-calls): skipped when not yet started",
            ("worker",), registry=r)
        self.worker_failures = Counter(
            "coded_worker_failures", "Worker calls that failed", ("worker", "reason"), registry=r)
        self.worker_restarts = Counter(
            "coded_worker_restarts", "Workers restarted by the supervisor", ("worker", "reason"),
            registry=r)
        self.workers_down = Gauge(
            "coded_workers_down", "Workers that cannot take calls (dead, restarting); the "
            "server is not ready while the rest cannot answer a coding group", registry=r)
        self.worker_ready = Gauge("coded_worker_ready", "1 when the worker is warmed up",
                                  ("worker",), registry=r)
        self.decode_seconds = Histogram(
            "coded_decode_duration_seconds", "Finalize time of the online decoder per group",
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), registry=r)
        self.encode_seconds = Histogram(
            "coded_encode_duration_seconds", "Frontend encoder time per group",
            buckets=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), registry=r)
        self.decode_waits = Counter(
            "coded_decode_waits", "Decodable groups that waited for a missing systematic "
            "result: outcome exact (it came in time) or decoded (the bound passed)",
            ("outcome",), registry=r)
        self.redispatched = Counter(
            "coded_redispatched_calls", "Systematic slots re-sent to a worker that had "
            "answered, because their group was undecodable when its missing calls became "
            "stragglers",
            registry=r)
        self.stalled_dispatches = Counter(
            "coded_stalled_dispatches", "Dispatches whose missing calls became stragglers "
            "(--straggler-scale times later than the first result); each gave its in-flight "
            "slot to the next dispatch",
            registry=r)
        self.partial_groups = Counter(
            "coded_partial_groups", "Groups dispatched with fewer than k queries at the "
            "max queue delay (padded)", MODEL_LABELS, registry=r)
        self.padded_queries = Counter(
            "coded_padded_queries", "Padding slots added to partial groups", MODEL_LABELS,
            registry=r)
        self.cancelled_queries = Counter(
            "coded_cancelled_queries", "Queued queries dropped before dispatch because their "
            "request gave up (client gone, timeout): never computed", MODEL_LABELS, registry=r)
        # Shadow decoding (runtime/shadow.py): rebuilt-from-parity answers checked against
        # the exact ones on live traffic
        self.shadow_decodes = Counter(
            "coded_shadow_decodes", "Known answers rebuilt from a parity and compared with the "
            "exact answer (shadow decodes)", registry=r)
        self.shadow_agreements = Counter(
            "coded_shadow_agreements", "Shadow-rebuilt answers whose class agreed with the exact "
            "answer's", ("head",), registry=r)
        self.shadow_compared = Counter(
            "coded_shadow_compared", "Shadow-rebuilt answers compared with the exact answer",
            ("head",), registry=r)
        self.shadow_dropped = Counter(
            "coded_shadow_dropped", "Shadow decodes dropped because their queue was full "
            "(the server was busy)", registry=r)
        self.shadow_rel_error = Histogram(
            "coded_shadow_embedding_rel_error", "||rebuilt - exact|| / ||exact|| of the "
            "embedding of a shadow-rebuilt answer",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0), registry=r)
        self.shadow_agreement = Gauge(
            "coded_shadow_agreement", "Class agreement of the last --shadow-window "
            "shadow-rebuilt answers with the exact ones", ("head",), registry=r)
        self.shadow_alert = Gauge(
            "coded_shadow_alert", "1 while some head's windowed shadow agreement is below "
            "--shadow-alert-below", registry=r)
        self.last_inference_s = 0.0  # wall clock (epoch seconds) of the last execution
        # The series every request, dispatch or worker call updates, bound to their labels
        # once: prometheus-client's labels() takes a lock and builds a key on every call
        # (seven calls per request were ~4 % of the event loop's time).
        bind = {name: family.labels(**self.labels) for name, family in (
            ("success", self._success), ("request_us", self._request_us),
            ("latency", self.request_latency), ("exec_count", self._exec_count),
            ("count", self._count), ("queue_us", self._queue_us),
            ("compute_us", self._compute_us), ("pending", self._pending),
            ("inflight", self.inflight_requests), ("rejected", self.rejected),
            ("reconstructed", self.reconstructed), ("partial", self.partial_groups),
            ("padded", self.padded_queries), ("cancelled_queries", self.cancelled_queries))}
        self._bound = bind
        self.inflight = bind["inflight"]  # Gauge child: inc() / dec()
        self._by_worker: dict[tuple[str, int], Any] = {}

    # Triton-style helpers (always labelled with this model) --------------------------------
    def request_success(self, duration_s: float) -> None:
        b = self._bound
        b["success"].inc()
        b["request_us"].inc(duration_s * 1e6)
        b["latency"].observe(duration_s)

    def request_failure(self, reason: str, duration_s: float) -> None:
        self._failure.labels(**self.labels, reason=reason).inc()
        self._bound["request_us"].inc(duration_s * 1e6)

    def request_rejected(self) -> None:
        """Refused (503) at admission, before its body was read."""
        self._bound["rejected"].inc()

    def group_executed(self, queries: int, queue_s: float, compute_s: float) -> None:
        self.last_inference_s = time.time()
        b = self._bound
        b["exec_count"].inc()
        b["count"].inc(queries)
        b["queue_us"].inc(queue_s * 1e6)
        b["compute_us"].inc(compute_s * 1e6)

    def partial_group(self, padded: int) -> None:
        """A group went out with `padded` padding slots."""
        self._bound["partial"].inc()
        self._bound["padded"].inc(padded)

    def answers_reconstructed(self, count: int) -> None:
        self._bound["reconstructed"].inc(count)

    def queries_cancelled(self, queries: int) -> None:
        """`queries` queued queries were dropped before dispatch (their request gave up)."""
        self._bound["cancelled_queries"].inc(queries)

    def set_pending(self, queries: int) -> None:
        self._bound["pending"].set(queries)

    def call_cancelled(self, worker: int) -> None:
        """A call of `worker` was cancelled: its group was answered without it."""
        self._worker_series("cancelled", worker).inc()

    def late_result_dropped(self, worker: int) -> None:
        self._worker_series("late", worker).inc()

    def erasure(self, worker: int) -> None:
        """`worker`'s result was missing when its group was answered."""
        self._worker_series("erasures", worker).inc()

    def _worker_series(self, which: str, worker: int) -> Any:
        series = self._by_worker.get((which, worker))
        if series is None:
            family = {"cancelled": self.cancelled_calls, "late": self.late_dropped,
                      "erasures": self.erasures}[which]
            series = self._by_worker[(which, worker)] = family.labels(worker=str(worker))
        return series

    def snapshot(self) -> dict[str, float]:
        """The engine's counters as plain numbers (for statistics endpoints and tests)."""
        r, labels = self.registry, self.labels

        def total(name: str, **extra: str) -> float:
            return sum(s.value for m in r.collect() for s in m.samples
                       if s.name == name and all(s.labels.get(k) == v for k, v in extra.items()))

        return {
            "request_success": total("nv_inference_request_success", **labels),
            "request_failure": total("nv_inference_request_failure", **labels),
            "inference_count": total("nv_inference_count", **labels),
            "execution_count": total("nv_inference_exec_count", **labels),
            "queue_us": total("nv_inference_queue_duration_us", **labels),
            "compute_us": total("nv_inference_compute_infer_duration_us", **labels),
            "request_us": total("nv_inference_request_duration_us", **labels),
            "success_us": 1e6 * total("coded_request_latency_seconds_sum", **labels),
            "last_inference_ms": 1e3 * self.last_inference_s,
            "reconstructed": total("coded_reconstructed_responses_total", **labels),
            "erasures": total("coded_erasures_total"),
            "late_results_dropped": total("coded_late_results_dropped_total"),
            "cancelled_calls": total("coded_cancelled_calls_total"),
            "partial_groups": total("coded_partial_groups_total", **labels),
            "padded_queries": total("coded_padded_queries_total", **labels),
            "redispatched_calls": total("coded_redispatched_calls_total"),
            "cancelled_queries": total("coded_cancelled_queries_total", **labels),
            "worker_failures": total("coded_worker_failures_total"),
            "worker_restarts": total("coded_worker_restarts_total"),
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)
