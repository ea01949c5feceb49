"""The soak benchmark's pieces: its requests, the checks of every answer, /proc sampling.

- `Workload.plan(i)`: request i, the same for a given seed whatever the timing: well-formed
  (real test images, batch 1..max_batch, UINT8 or FP32, JSON or binary tensors, JSON or
  binary outputs, id `soak-<seed>-<i>`) or one of `MALFORMED` (each must get a 4xx with a
  JSON {"error"} body: `EXPECTED_STATUS`, 400 unless listed);
- `Checker.check(...)`: one 200 response against the reference logits;
- `ProcSampler`: RSS, open fds, threads and CPU seconds of a process (bench/overload.py too);
- what the records report: `per_second`, `flatness`, `percentiles`, `fetch_metrics`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import F_IO, HEAD_IO, RECONSTRUCTED_OUTPUT, Manifest, class_output, logits_output
from runtime.model_io import preprocess
from runtime.protocol import DATATYPES, HEADER_LENGTH

TIE_TOL = 1e-4  # reference logits closer than this (x max(1, |logit|)) are a tie, not a wrong class
JSON_CT = {"Content-Type": "application/json"}


def load_images(m: Manifest, num: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(images [N, C, H, W] uint8, labels or None, source): the bundle's test split when the
    manifest names a known dataset of its input shape, else seeded random images."""
    from trainer.data import DATASETS, load_split  # numpy + gzip only

    dataset = str(m.provenance.get("dataset", ""))
    if dataset in DATASETS and DATASETS[dataset].image_shape == tuple(m.input.shape):
        x, y = load_split(dataset, "test")
        return x[:num], y[:num], f"{dataset} test split"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num, *m.input.shape), dtype=np.uint8), None, "seeded random uint8"


def ort_reference(bundle: str | Path, m: Manifest, images: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
    """{task: logits [N, classes] float64}: ONNX Runtime on f.onnx + each head, manifest preprocessing."""
    import onnxruntime as ort

    def session(rel: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(Path(bundle) / rel), providers=["CPUExecutionProvider"])

    f = session(m.f)
    heads = {h.task: session(h.file) for h in m.heads}
    out: dict[str, list[np.ndarray]] = {t: [] for t in heads}
    for s in range(0, len(images), batch):
        z = f.run([F_IO[1]], {F_IO[0]: preprocess(images[s:s + batch], m.input)})[0]  # [b, *emb]
        for task, head in heads.items():
            out[task].append(head.run([HEAD_IO[1]], {HEAD_IO[0]: z})[0])  # [b, classes]
    return {t: np.concatenate(v).astype(np.float64) for t, v in out.items()}


@dataclass
class Planned:
    kind: str  # "ok" or a MALFORMED name
    body: bytes
    headers: dict[str, str]
    model: str
    rid: str | None = None
    idx: np.ndarray | None = None  # [B] image indices of the queries (well-formed only)


def _input(name: str, shape: list[Any], datatype: str, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, **extra}]}


def _binary(request: dict[str, Any], blob: bytes, header_length: str | None = None) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(request).encode()
    return header + blob, {"Content-Type": "application/octet-stream",
                           HEADER_LENGTH: header_length or str(len(header))}


class Workload:
    """Requests by index (`config`: a SoakConfig)."""

    def __init__(self, config: Any, m: Manifest, images: np.ndarray, max_batch_size: int) -> None:
        self.config, self.images, self.max_batch_size = config, images, max_batch_size
        self.model, self.name, self.chw = m.model_name, m.input.name, list(m.input.shape)
        self.count = int(np.prod(self.chw))
        self.pixels = images[0].reshape(-1).tolist()

    def plan(self, i: int) -> Planned:
        c = self.config
        rng = np.random.default_rng((c.seed, i))
        if rng.random() < c.malformed_fraction:
            kind = MALFORMED_KINDS[int(rng.integers(len(MALFORMED_KINDS)))]
            body, headers = MALFORMED[kind](self)
            return Planned(kind, body, headers, "no-such-model" if kind == "unknown_model" else self.model)
        idx = rng.integers(0, len(self.images), int(rng.integers(1, c.max_batch + 1)))
        x = self.images[idx]  # [B, C, H, W] uint8
        datatype = "UINT8"
        if rng.random() < c.fp32_fraction:
            x, datatype = x.astype(np.float32) / np.float32(255.0), "FP32"
        shape = list(x.shape[1:]) if len(idx) == 1 and rng.random() < 0.2 else list(x.shape)  # [C, H, W]: B = 1
        rid = f"soak-{c.seed}-{i}"
        top: dict[str, Any] = {"id": rid}
        if rng.random() < c.binary_output_fraction:
            top["parameters"] = {"binary_data_output": True}
        if rng.random() < c.binary_fraction:
            blob = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
            body, headers = _binary({**top, **_input(self.name, shape, datatype,
                                                     parameters={"binary_data_size": len(blob)})}, blob)
        else:
            body = json.dumps({**top, **_input(self.name, shape, datatype, data=x.reshape(-1).tolist())}).encode()
            headers = JSON_CT
        return Planned("ok", body, headers, self.model, rid, idx)

    # -- pieces of the malformed requests ------------------------------------------------------
    def one(self, datatype: str = "UINT8", shape: list[Any] | None = None, data: Any = None,
            name: str | None = None, **top: Any) -> tuple[bytes, dict[str, str]]:
        """A JSON request for one image with any part replaced."""
        request = _input(name or self.name, shape or [1, *self.chw], datatype,
                         data=self.pixels if data is None else data)
        return json.dumps({**request, **top}).encode(), JSON_CT

    def binary(self, batch: int = 1, size_delta: int = 0, header_length: str | None = None,
               **extra: Any) -> tuple[bytes, dict[str, str]]:
        blob = bytes(batch * self.count)
        request = _input(self.name, [batch, *self.chw], "UINT8",
                         parameters={"binary_data_size": len(blob) + size_delta}, **extra)
        return _binary(request, blob, header_length)


def _lying_length(w: Workload) -> tuple[bytes, dict[str, str]]:
    body, headers = w.binary()
    return body, {**headers, HEADER_LENGTH: str(len(body) + 7)}


MALFORMED: dict[str, Callable[[Workload], tuple[bytes, dict[str, str]]]] = {
    "bad_json": lambda w: (b'{"inputs": [{"name": "INPUT", "shape": [1,', JSON_CT),
    "not_an_object": lambda w: (b"[1, 2, 3]", JSON_CT),
    "invalid_utf8": lambda w: (b'{"inputs": "\xff\xfe"}', JSON_CT),
    "deep_nesting": lambda w: (b"[" * 100_000 + b"]" * 100_000, JSON_CT),
    "huge_integer": lambda w: (b'{"inputs": [{"name": "INPUT", "shape": [1' + b"9" * 5000
                               + b'], "datatype": "UINT8", "data": [0]}]}', JSON_CT),
    "empty_body": lambda w: (b"", JSON_CT),
    "wrong_shape": lambda w: w.one(shape=[1, w.chw[0], w.chw[1] + 1, w.chw[2]],
                                   data=[0] * (w.count + w.chw[0] * w.chw[2])),
    "wrong_rank": lambda w: w.one(shape=[w.count]),
    "negative_dim": lambda w: w.one(shape=[-1, *w.chw]),
    "batch_too_large": lambda w: w.binary(batch=w.max_batch_size + 1),
    "count_mismatch": lambda w: w.one(data=w.pixels[:-1]),
    "not_accepted_dtype": lambda w: w.one(datatype="INT32"),
    "unknown_dtype": lambda w: w.one(datatype="FLOAT"),
    "bool_data": lambda w: w.one(data=[True, False] * (w.count // 2) + [True] * (w.count % 2)),
    "string_data": lambda w: w.one(data=["7"] * w.count),
    "uint8_out_of_range": lambda w: w.one(data=[300] * w.count),
    "fp32_nan": lambda w: w.one(datatype="FP32", data=[float("nan")] * w.count),
    "fp32_out_of_range": lambda w: w.one(datatype="FP32", data=[2.0] * w.count),
    "header_length_lies": _lying_length,
    "header_length_not_digits": lambda w: w.binary(header_length="12abc"),
    "binary_size_mismatch": lambda w: w.binary(size_delta=-1),
    "binary_and_data": lambda w: w.binary(data=[0]),
    "id_not_string": lambda w: w.one(id=5),
    "unknown_field": lambda w: w.one(priority=1),
    "wrong_input_name": lambda w: w.one(name="IMAGE"),
    "unknown_output": lambda w: w.one(outputs=[{"name": "no_such_output"}]),
    "bad_timeout": lambda w: w.one(parameters={"timeout_ms": -5}),
    "unknown_model": lambda w: w.one(),
    "too_large": lambda w: (b" " * (w.config.max_body_bytes + 1), JSON_CT),
}
MALFORMED_KINDS = sorted(MALFORMED)
EXPECTED_STATUS = {"unknown_model": 404, "too_large": 413}  # 400 for the others


def decode_response(raw: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON header, outputs by name) of a KServe v2 response, JSON or binary outputs."""
    length = headers.get(HEADER_LENGTH)
    header = json.loads(raw[:int(length)] if length else raw)
    blob, offset, outputs = raw[int(length):] if length else b"", 0, {}
    for out in header["outputs"]:
        dtype = DATATYPES[out["datatype"]]
        if "data" in out:
            array = np.asarray(out["data"], dtype=dtype)
        else:
            size = int(out["parameters"]["binary_data_size"])
            array = np.frombuffer(blob, dtype.newbyteorder("<"), size // dtype.itemsize, offset)
            offset += size
        outputs[out["name"]] = array.reshape(out["shape"])
    return header, outputs


class Checker:
    """Every 200 answer against the reference logits ({task: [N, classes]}); counts in `c`."""

    def __init__(self, m: Manifest, reference: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        self.reference, self.labels = reference, labels
        self.tasks = [h.task for h in m.heads]
        self.primary = m.primary_head.task
        self.answered: set[str] = set()
        self.c: Counter[str] = Counter()
        self.max_abs_logit_diff = 0.0  # unflagged answers vs the reference
        self.wrong_examples: list[dict[str, Any]] = []

    def check(self, p: Planned, raw: bytes, headers: Mapping[str, str]) -> str:
        """'ok', or what is wrong: 'bad_response', 'id_mismatch', 'duplicate'."""
        try:
            header, out = decode_response(raw, headers)
            flags = out[RECONSTRUCTED_OUTPUT].astype(bool)
            classes = {t: out[class_output(t)] for t in self.tasks}
            logits = {t: out[logits_output(t)].astype(np.float64) for t in self.tasks}
            param = header["parameters"]["reconstructed"]
        except (ValueError, KeyError, TypeError, IndexError):
            return "bad_response"
        if header.get("id") != p.rid:
            return "id_mismatch"
        if p.rid in self.answered:
            return "duplicate"
        self.answered.add(p.rid)
        assert p.idx is not None  # well-formed requests carry their image indices
        b = len(p.idx)
        if flags.shape != (b,) or param != bool(flags.any()) or any(
                classes[t].shape != (b,) or logits[t].shape != (b, self.reference[t].shape[1]) for t in self.tasks):
            return "bad_response"
        for j, image in enumerate(p.idx):
            self._query(int(image), bool(flags[j]), {t: int(classes[t][j]) for t in self.tasks},
                        {t: logits[t][j] for t in self.tasks}, p.rid)
        return "ok"

    def _query(self, image: int, flagged: bool, got: dict[str, int], logits: dict[str, np.ndarray], rid: str) -> None:
        c = self.c
        for task in self.tasks:
            ref = self.reference[task][image]
            want = int(np.argmax(ref))
            if got[task] < 0:
                c["unavailable"] += 1
                continue
            if task == self.primary:
                c["reconstructed" if flagged else "plain"] += 1
                c["reconstructed_agree" if flagged else "plain_agree"] += got[task] == want
                if self.labels is not None:
                    c["reconstructed_label_correct" if flagged else "plain_label_correct"] += \
                        got[task] == int(self.labels[image])
            if flagged:
                continue
            self.max_abs_logit_diff = max(self.max_abs_logit_diff, float(np.abs(logits[task] - ref).max()))
            if got[task] != want:
                tie = ref[want] - ref[got[task]] <= TIE_TOL * max(1.0, float(np.abs(ref).max()))
                c["ties" if tie else "unflagged_wrong"] += 1
                if not tie and len(self.wrong_examples) < 10:
                    self.wrong_examples.append({"id": rid, "image": image, "task": task, "got": got[task],
                                                "reference": want, "logits": logits[task].tolist()})

    def summary(self) -> dict[str, Any]:
        c = self.c

        def frac(num: str, den: str) -> float | None:
            return c[num] / c[den] if c[den] else None

        out: dict[str, Any] = {**{k: int(v) for k, v in sorted(c.items())},
                               "primary_task": self.primary,
                               "reconstructed_agreement_with_reference": frac("reconstructed_agree", "reconstructed"),
                               "plain_max_abs_logit_diff": self.max_abs_logit_diff,
                               "unflagged_wrong_examples": self.wrong_examples}
        if self.labels is not None:
            out["plain_label_accuracy"] = frac("plain_label_correct", "plain")
            out["reconstructed_label_accuracy"] = frac("reconstructed_label_correct", "reconstructed")
        return out


class ProcSampler:
    """RSS (VmRSS), open fds, threads and CPU seconds of one process, from /proc (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[dict[str, float]] = []

    def sample(self) -> dict[str, float] | None:
        """None once the process is gone (or a zombie)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" not in fields:
            return None
        return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "fds": fds,
                "threads": int(fields["Threads"]),
                "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")}  # utime + stime

    async def run(self, t0: float, period_s: float, stop: asyncio.Event) -> None:
        """Sample every period_s (on a fixed grid from t0) until `stop` is set or the process is gone."""
        tick = 0
        while not stop.is_set():
            s = self.sample()
            if s is None:
                return
            self.samples.append({"t_s": round(time.perf_counter() - t0, 3), **s})
            tick += 1
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, t0 + tick * period_s - time.perf_counter()))
            except TimeoutError:
                pass


def per_second(rows: list[tuple[float, float, int, int]], wall_s: float) -> list[dict[str, float | None]]:
    """Per second of the main phase: 200 responses (rows: t_end_s, latency_s, status, queries),
    their queries, and their p99 latency."""
    ok = np.asarray([(r[0], r[1], r[3]) for r in rows if r[2] == 200], dtype=np.float64).reshape(-1, 3)
    ok = ok[np.argsort(ok[:, 0], kind="stable")]
    edges = np.searchsorted(ok[:, 0], np.arange(int(np.ceil(wall_s)) + 1))
    out: list[dict[str, float | None]] = []
    for s, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        out.append({"t_s": s, "ok_rps": int(hi - lo), "queries_per_s": int(ok[lo:hi, 2].sum()),
                    "p99_ms": float(np.percentile(ok[lo:hi, 1], 99) * 1e3) if hi > lo else None})
    return out


def flatness(values: list[float], rel: float = 0.0, add: float = 0.0,
             times_s: list[float] | None = None) -> dict[str, Any]:
    """Last-quarter median <= second-quarter median x (1 + rel) + add; None below 8 samples.
    With `times_s`, also the least-squares slope per minute after the first quarter."""
    v = np.asarray(values, dtype=np.float64)
    q = len(v) // 4
    if q < 2:
        return {"flat": None, "reason": f"only {len(v)} samples (need 8)"}
    m2, m4 = float(np.median(v[q:2 * q])), float(np.median(v[3 * q:]))
    limit = m2 * (1 + rel) + add
    out = {"second_quarter_median": m2, "last_quarter_median": m4, "limit": limit,
           "min": float(v.min()), "max": float(v.max()), "flat": bool(m4 <= limit)}
    if times_s is not None:
        out["slope_per_min_after_warmup"] = float(np.polyfit(np.asarray(times_s[q:]) / 60.0, v[q:], 1)[0])
    return out


async def fetch_metrics(session: Any, url: str) -> dict[str, float]:
    """Sums of the server's Prometheus samples by metric name (`name{reason=...}` for failures)."""
    try:
        async with session.get(url) as resp:
            text = await resp.text()
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"error": str(exc)}  # type: ignore[dict-item]
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        head, value = line.rsplit(" ", 1)
        name = head.split("{", 1)[0]
        if name.endswith(("_bucket", "_created")):
            continue
        if "reason=" in head and name in ("nv_inference_request_failure", "coded_worker_failures_total",
                                          "coded_worker_restarts_total"):
            name += "{" + head.split('reason="', 1)[1].split('"', 1)[0] + "}"
        out[name] = out.get(name, 0.0) + float(value)
    return out


def percentiles(lat_ms: list[float]) -> dict[str, float]:
    if not lat_ms:
        return {}
    p50, p99, p999 = np.percentile(lat_ms, [50, 99, 99.9])
    return {"count": len(lat_ms), "p50": float(p50), "p99": float(p99), "p99.9": float(p999),
            "max": float(max(lat_ms))}
