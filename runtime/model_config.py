"""What the server says about itself and its model, whatever the wire protocol.

Protocol-neutral builders of plain JSON-able dicts: runtime/http_server.py serialises them
as they are, runtime/grpc_server.py parses them into the official protobuf messages with
`google.protobuf.json_format.ParseDict`. So each dict is exactly the JSON mapping of its
message (snake_case field names, enum values by name, int64 values as JSON numbers):

| builder | HTTP route | gRPC message |
|---|---|---|
| `server_metadata()` | `GET /v2` | `ServerMetadataResponse` |
| `model_metadata(manifest, mode)` | `GET /v2/models/{m}` | `ModelMetadataResponse` (less `parameters`) |
| `model_config(manifest, config)` | `GET /v2/models/{m}/config` | `ModelConfig` (Triton) |
| `model_statistics(manifest, snapshot)` | one of `GET /v2/models[/{m}]/stats`'s `model_stats` | `ModelStatistics` |
| `coded_statistics(snapshot)` | HTTP only: `"coded"` beside a model's statistics | none (also in /metrics) |
| `repository_index(manifest, ready)` | `POST /v2/repository/index` | `RepositoryIndexResponse.models` |

The model has one version, "1". Nothing here reads a file or a clock; `snapshot` is
`Engine.statistics()` (runtime/metrics.py `Metrics.snapshot()`).
"""

from __future__ import annotations

import json
from typing import Any

from runtime.config import ServerConfig
from runtime.manifest import Manifest
from runtime.model_io import output_specs
from runtime.modes import MODES

SERVER_NAME = "coded-invnet-runtime"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"
PLATFORM = "coded-invnet"  # KServe metadata "platform"; Triton config platform and backend
EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration", "statistics",
              "model_repository")
CANONICAL_DTYPE = "UINT8"  # the input's advertised datatype; FP32 in [0, 1] is accepted too
TRITON_DTYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "INT64": "TYPE_INT64",
                 "FP32": "TYPE_FP32"}
RAW_INPUT = "UINT8 0..255 or FP32 in [0, 1]; the server normalises"
OUTPUTS_DOC = ("<task>_logits: FP32 [B, classes]; <task>_class: INT64 [B] argmax (-1 when the "
               "head is unavailable); reconstructed: BOOL [B], true when the answer was decoded "
               "from coded results. Response parameters: reconstructed (any), "
               "reconstructed_queries, mode, unavailable_heads (ParM)")
REQUEST_PARAMETERS_DOC = "timeout_ms (or Triton's timeout in us), binary_data_output"


def server_metadata() -> dict[str, Any]:
    """KServe v2 server metadata: name, version and every extension served."""
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}


def _input_dtype(manifest: Manifest) -> str:
    accepted = manifest.input.accepted_dtypes
    return CANONICAL_DTYPE if CANONICAL_DTYPE in accepted else accepted[0]


def model_metadata(manifest: Manifest, mode: str) -> dict[str, Any]:
    """KServe v2 model metadata: one input (its canonical datatype; the others it accepts
    are in `parameters.input_datatypes`), the served outputs, and what they mean; `n`, `k`
    are the served code's, `codes` lists every code of the bundle ("n,k", served first)."""
    spec, coding = manifest.input, manifest.coding
    return {
        "name": manifest.model_name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": spec.name, "datatype": _input_dtype(manifest),
                    "shape": [-1, *spec.shape]}],
        "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
                    for o in output_specs(manifest)],
        "parameters": {
            "mode": mode, "n": coding.n, "k": coding.k, "codes": manifest.code_labels(),
            "workers": MODES[mode].pool_size(manifest),
            "input_datatypes": {spec.name: list(spec.accepted_dtypes)},
            "classes": {h.task: list(h.classes) for h in manifest.heads},
            "preprocessing": {"mean": list(spec.preprocessing.mean),
                              "std": list(spec.preprocessing.std),
                              "raw": RAW_INPUT},
            "outputs": OUTPUTS_DOC,
            "request_parameters": REQUEST_PARAMETERS_DOC,
        },
    }


def _dims(shape: tuple[int, ...]) -> dict[str, Any]:
    """Triton dims of a served tensor without its batch dimension (max_batch_size > 0); a
    per-query scalar is dims [1] reshaped to [], as Triton writes it."""
    per_query = list(shape[1:]) if shape and shape[0] == -1 else list(shape)
    if per_query:
        return {"dims": per_query}
    return {"dims": [1], "reshape": {"shape": []}}


def _string(value: Any) -> dict[str, str]:
    return {"string_value": value if isinstance(value, str) else json.dumps(value)}


def model_config(manifest: Manifest, config: ServerConfig) -> dict[str, Any]:
    """Triton's model configuration (the JSON mapping of `inference.ModelConfig`): tensors
    without the batch dimension, the batcher as `dynamic_batching`, the workers as one
    instance group, and the served coding scheme (`codes`: every code of the bundle) and
    the serving options under `parameters` (string values; lists and objects as JSON text)."""
    spec, coding = manifest.input, manifest.coding
    mode = MODES[config.mode]
    outputs = []
    for o in output_specs(manifest):
        outputs.append({"name": o.name, "data_type": TRITON_DTYPES[o.datatype], **_dims(o.shape)})
    parameters = {
        "mode": config.mode,
        "n": coding.n,
        "k": coding.k,
        "coefficients": [list(row) for row in coding.coefficients],
        "codes": manifest.code_labels(),  # every code of the bundle, "n,k", the served one first
        "workers": mode.pool_size(manifest),
        "engine": config.engine,
        "device": config.device,
        "encoders_on_workers": config.encoders_on_workers,
        "max_groups_per_call": config.max_groups_per_call,
        "input_datatypes": list(spec.accepted_dtypes),
        "preprocessing": {"mean": list(spec.preprocessing.mean),
                          "std": list(spec.preprocessing.std), "raw": RAW_INPUT},
        "classes": {h.task: list(h.classes) for h in manifest.heads},
        "outputs": OUTPUTS_DOC,
    }
    return {
        "name": manifest.model_name,
        "platform": PLATFORM,
        "backend": PLATFORM,
        "version_policy": {"specific": {"versions": [int(MODEL_VERSION)]}},
        "max_batch_size": config.max_batch_size,
        "input": [{"name": spec.name, "data_type": TRITON_DTYPES[_input_dtype(manifest)],
                   "format": "FORMAT_NCHW" if len(spec.shape) == 3 else "FORMAT_NONE",
                   "dims": list(spec.shape)}],
        "output": outputs,
        "dynamic_batching": {
            "preferred_batch_size": [coding.k],  # a coding group goes out once k are queued
            "max_queue_delay_microseconds": round(config.max_queue_delay_ms * 1000),
        },
        "instance_group": [{"name": f"{manifest.model_name}-workers",
                            "kind": "KIND_GPU" if config.device == "cuda" else "KIND_CPU",
                            "count": mode.pool_size(manifest)}],
        "parameters": {key: _string(value) for key, value in parameters.items()},
    }


def _duration(count: float, us: float) -> dict[str, int]:
    return {"count": int(count), "ns": max(0, round(us * 1000))}


def model_statistics(manifest: Manifest, snapshot: dict[str, float]) -> dict[str, Any]:
    """Triton's statistics of the model (the JSON mapping of `inference.ModelStatistics`).

    Each duration is summed over the unit its count counts: success and fail over requests
    (end to end), queue over queries (time waiting for a coding group), compute_infer over
    executions (one dispatch of coding groups: encode, workers, decode, heads). Input and
    output handling are inside compute_infer (compute_input and compute_output stay 0);
    there is no response cache."""
    s = snapshot
    zero = _duration(0, 0)
    return {
        "name": manifest.model_name,
        "version": MODEL_VERSION,
        "last_inference": int(s["last_inference_ms"]),
        "inference_count": int(s["inference_count"]),
        "execution_count": int(s["execution_count"]),
        "inference_stats": {
            "success": _duration(s["request_success"], s["success_us"]),
            "fail": _duration(s["request_failure"], s["request_us"] - s["success_us"]),
            "queue": _duration(s["inference_count"], s["queue_us"]),
            "compute_input": zero,
            "compute_infer": _duration(s["execution_count"], s["compute_us"]),
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
    }


CODED_COUNTERS = ("reconstructed", "erasures", "late_results_dropped", "cancelled_calls",
                  "partial_groups",
                  "padded_queries", "redispatched_calls", "cancelled_queries",
                  "worker_failures", "worker_restarts")


def coded_statistics(snapshot: dict[str, float]) -> dict[str, int]:
    """The coded-serving counters since start (Triton's statistics have no place for them):
    answers reconstructed from coded results, worker results missing when a group was
    answered (erasures), arriving after it (late_results_dropped) or cancelled because it
    was answered without them (cancelled_calls), partial groups and
    their padding slots, systematic slots re-sent, queued queries dropped because their
    request gave up (cancelled_queries, never computed), worker failures and restarts."""
    return {key: int(snapshot[key]) for key in CODED_COUNTERS}


def repository_index(manifest: Manifest, ready: bool, reason: str = "") -> list[dict[str, str]]:
    """The model repository index: this server's one model and whether it can answer now
    (`reason` says why not; Triton's states READY / UNAVAILABLE)."""
    return [{"name": manifest.model_name, "version": MODEL_VERSION,
             "state": "READY" if ready else "UNAVAILABLE",
             "reason": "" if ready else (reason or "not ready")}]
