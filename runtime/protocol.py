"""KServe v2 inference protocol: request parsing/validation and response encoding.

Supports JSON tensors and the binary tensor extension: a body of
`<JSON header><binary tensors>` with `Inference-Header-Content-Length: <JSON bytes>`;
an input carries `"parameters": {"binary_data_size": N}` instead of `"data"`; an output
requested with `"parameters": {"binary_data": true}` (or every output, with the request
parameter `"binary_data_output": true`) is returned raw, after the JSON header.

Every parse error is a BadRequest whose message says what was expected and what arrived.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from runtime.errors import BadRequest
from runtime.manifest import InputSpec

HEADER_LENGTH = "Inference-Header-Content-Length"

# KServe v2 datatype -> numpy dtype (BYTES is variable-length: not a valid image type).
DATATYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": None,
}
NUMPY_TO_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64",
                     np.dtype(np.bool_): "BOOL"}
KNOWN_PARAMETERS = {"timeout_ms", "timeout", "binary_data_output"}
REQUEST_FIELDS = {"id", "model_name", "model_version", "inputs", "outputs", "parameters"}
MODEL_VERSION = "1"  # the served model's one version


@dataclass(frozen=True)
class InferRequest:
    request_id: str | None
    raw: np.ndarray  # [B, C, H, W] uint8 or float32 in [0, 1]
    outputs: dict[str, bool] | None  # requested name -> binary; None: all outputs
    binary_default: bool  # binary_data_output request parameter
    timeout_s: float | None


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{where} must be a non-negative integer, got {_show(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    """JSON true/false only: the strings "false" or "no" must not turn an option on."""
    if not isinstance(value, bool):
        raise BadRequest(f"{where} must be a JSON boolean (true or false), got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A value for an error message, cut short (a 4,000-digit integer is not echoed)."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 64 else \
        f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 80 else text[:77] + "..."


MAX_TIMEOUT_S = 24 * 3600.0  # longer than any request may wait; larger values are typos


def _timeout_s(params: dict[str, Any]) -> float | None:
    """`timeout_ms` (this server) or `timeout` (Triton/tritonclient, microseconds)."""
    for key, scale in (("timeout_ms", 1e-3), ("timeout", 1e-6)):
        if key in params:
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"parameter {key!r} must be a positive number, got {_show(value)}")
            # compare before converting: an integer of 400 digits has no float
            if (isinstance(value, float) and not math.isfinite(value)) \
                    or not 0 < value <= MAX_TIMEOUT_S / scale:
                raise BadRequest(f"parameter {key!r} must be a positive number of at most "
                                 f"{MAX_TIMEOUT_S / scale:.0f} ({MAX_TIMEOUT_S / 3600:.0f} h), "
                                 f"got {_show(value)}")
            return float(value) * scale
    return None


def _decode_json(header: bytes) -> dict[str, Any]:
    # orjson is 4-5x faster on the hot path; it is stricter than json (no NaN, no integers
    # beyond 64 bits, no lone surrogates), so anything it refuses is parsed again by json,
    # which accepts or explains exactly as before.
    try:
        return _obj(orjson.loads(header), "request body")
    except orjson.JSONDecodeError:
        pass
    try:
        body = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise BadRequest("request body is JSON nested too deeply; a KServe v2 request nests "
                         "a few levels") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise BadRequest(f"request body has a JSON value this server cannot read: {exc}") from None
    return _obj(body, "request body")


def _has_booleans(data: list[Any]) -> bool:
    """Whether a nested list holds a JSON true/false (numpy reads them as 1/0)."""
    stack = [data]
    while stack:
        for value in stack.pop():
            if isinstance(value, list):
                stack.append(value)
            elif isinstance(value, bool):
                return True
    return False


def _tensor_from_json(data: Any, dtype: str, count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{where}.data must be a (possibly nested) JSON list of numbers, "
                         f"got {type(data).__name__}")
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise BadRequest(f"{where}.data is a ragged nested list: {exc}") from exc
    if values.dtype.kind not in "iuf" or values.dtype == np.bool_ or (
            values.dtype.kind in "iu" and _has_booleans(data)):
        raise BadRequest(f"{where}.data must hold only numbers for datatype {dtype}, got "
                         f"elements of numpy kind {values.dtype.kind!r} (strings, booleans, "
                         "objects, nulls or integers beyond 64 bits?)")
    values = values.reshape(-1)
    if values.size != count:
        raise BadRequest(f"{where}: shape needs {count} elements, data has {values.size}")
    if dtype == "UINT8":
        if values.dtype.kind == "f" and not np.all(values == np.round(values)):
            raise BadRequest(f"{where}: UINT8 data must be integers 0..255")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise BadRequest(f"{where}: UINT8 data must be in 0..255, got "
                             f"[{values.min()}, {values.max()}]")
        return values.astype(np.uint8)
    return values.astype(np.float32)


def _check_target(request: dict[str, Any], model_name: str | None,
                  model_version: str | None) -> None:
    """The body's optional model_name / model_version must be the request's own model."""
    if "model_name" in request:
        name = request["model_name"]
        if not isinstance(name, str):
            raise BadRequest(f"request 'model_name' must be a string, got {_show(name)}")
        if model_name is not None and name != model_name:
            raise BadRequest(f"request 'model_name' is {_show(name)} but the request was sent "
                             f"to model {model_name!r}; they must match (or leave it out)")
    if "model_version" in request:
        version = request["model_version"]
        if not isinstance(version, str):
            raise BadRequest(f"request 'model_version' must be a string, got {_show(version)}")
        expected = model_version or MODEL_VERSION
        if version not in ("", expected):
            raise BadRequest(f"request 'model_version' is {_show(version)} but the request was "
                             f"sent to version {expected!r}; they must match (or leave it out)")


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    spec: InputSpec,
    output_names: list[str],
    max_batch_size: int,
    model_name: str | None = None,
    model_version: str | None = None,
) -> InferRequest:
    """Validate a KServe v2 infer request against the model's single image input.

    `model_name` / `model_version`: the model (and version, None when not given) that the
    request was sent to; a body naming them too (the KServe SDK's REST client sends
    `model_name`) must name the same."""
    binary = b""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or len(header_length) > 12:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer byte count (digits only), got "
                             f"{header_length[:40]!r}")
        json_bytes = int(header_length)
        if not 0 < json_bytes <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {json_bytes} but the body has {len(body)} "
                             "bytes; it must be the size of the JSON part")
        body, binary = body[:json_bytes], body[json_bytes:]
    request = _decode_json(body)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"request 'id' must be a string, got {type(request_id).__name__}")
    params = _obj(request.get("parameters", {}), "request 'parameters'")
    unknown_keys = set(request) - REQUEST_FIELDS
    if unknown_keys:
        raise BadRequest(f"unknown request field(s) {sorted(unknown_keys)}; a KServe v2 request "
                         f"has {', '.join(sorted(REQUEST_FIELDS))}")
    _check_target(request, model_name, model_version)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(f"request needs a non-empty 'inputs' list with the tensor {spec.name!r}")
    names = [_obj(t, "each input").get("name") for t in inputs]
    if spec.name not in names:
        raise BadRequest(f"missing input {spec.name!r}; the request has {names}")
    if len(inputs) != 1:
        raise BadRequest(f"this model takes exactly one input, {spec.name!r}; got {names}")
    tensor = inputs[0]
    where = f"input {spec.name!r}"
    unknown_keys = set(tensor) - {"name", "shape", "datatype", "data", "parameters"}
    if unknown_keys:
        raise BadRequest(f"{where}: unknown field(s) {sorted(unknown_keys)}")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"{where}: unknown datatype {datatype!r}; KServe v2 datatypes are "
                         f"{sorted(DATATYPES)}")
    if datatype not in spec.accepted_dtypes:
        raise BadRequest(f"{where}: datatype {datatype} is not accepted; send one of "
                         f"{list(spec.accepted_dtypes)} (UINT8 0..255 or FP32 in [0, 1])")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape:
        raise BadRequest(f"{where}: 'shape' must be a non-empty list of integers")
    shape = [_int(s, f"{where}.shape[{i}]") for i, s in enumerate(shape)]
    per_query = list(spec.shape)
    if shape == per_query:
        shape = [1, *shape]
    if len(shape) != len(per_query) + 1 or shape[1:] != per_query:
        raise BadRequest(f"{where}: expected shape [B, {', '.join(map(str, per_query))}] or "
                         f"{per_query}, got {tensor['shape']}")
    batch = shape[0]
    if not 1 <= batch <= max_batch_size:
        raise BadRequest(f"{where}: batch size must be 1..{max_batch_size}, got {batch}")
    count = math.prod(shape)
    tparams = _obj(tensor.get("parameters", {}), f"{where}.parameters")
    dtype = DATATYPES[datatype]
    if "binary_data_size" in tparams:
        size = _int(tparams["binary_data_size"], f"{where}.parameters.binary_data_size")
        if "data" in tensor:
            raise BadRequest(f"{where}: give either 'data' or binary_data_size, not both")
        if size != len(binary):
            raise BadRequest(f"{where}: binary_data_size is {size} but {len(binary)} bytes of "
                             f"binary data follow the {HEADER_LENGTH} JSON header")
        if size != count * dtype.itemsize:
            raise BadRequest(f"{where}: shape {shape} of {datatype} needs "
                             f"{count * dtype.itemsize} bytes, binary_data_size is {size}")
        raw = np.frombuffer(binary, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        if binary:
            raise BadRequest(f"{len(binary)} bytes of binary data follow the JSON header but no "
                             "input declares parameters.binary_data_size")
        if "data" not in tensor:
            raise BadRequest(f"{where}: needs 'data' (JSON) or parameters.binary_data_size "
                             "(binary extension)")
        raw = _tensor_from_json(tensor["data"], datatype, count, where)
    raw = raw.reshape(shape)
    if datatype == "FP32":
        if not np.isfinite(raw).all():
            raise BadRequest(f"{where}: FP32 pixels must be finite numbers in [0, 1], got NaN/inf")
        if raw.size and (raw.min() < 0.0 or raw.max() > 1.0):
            raise BadRequest(f"{where}: FP32 pixels must be in [0, 1] (raw / 255); got range "
                             f"[{raw.min():.4g}, {raw.max():.4g}]. Send UINT8 for 0..255 pixels")
    outputs = None
    if "outputs" in request:
        requested = request["outputs"]
        if not isinstance(requested, list):
            raise BadRequest("'outputs' must be a list of {name, parameters}")
        outputs = {}
        for i, out in enumerate(requested):
            out = _obj(out, f"outputs[{i}]")
            name = out.get("name")
            if name not in output_names:
                raise BadRequest(f"outputs[{i}]: unknown output {name!r}; this model has "
                                 f"{output_names}")
            oparams = _obj(out.get("parameters", {}), f"outputs[{i}].parameters")
            if "classification" in oparams:
                raise BadRequest(f"outputs[{i}]: the classification extension is not supported; "
                                 f"request '{name}' and read the *_class outputs instead")
            outputs[name] = _bool(oparams.get("binary_data", False),
                                  f"outputs[{i}].parameters.binary_data")
    return InferRequest(
        request_id=request_id,
        raw=raw,
        outputs=outputs,
        binary_default=_bool(params.get("binary_data_output", False),
                             "parameter 'binary_data_output'"),
        timeout_s=_timeout_s(params),
    )


def encode_response(
    model_name: str,
    request_id: str | None,
    tensors: dict[str, np.ndarray],
    requested: dict[str, bool] | None,
    binary_default: bool,
    parameters: dict[str, Any],
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) for the outputs; binary outputs follow the JSON header."""
    names = list(tensors) if requested is None else list(requested)
    outputs, blobs = [], []
    for name in names:
        array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": NUMPY_TO_DATATYPE[array.dtype],
                                 "shape": list(array.shape)}
        binary = binary_default if requested is None else requested[name]
        if binary:
            blob = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # orjson writes NaN (an unavailable head) as null, as KServe clients expect
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1",
                                "parameters": parameters, "outputs": outputs}
    if request_id is not None:
        response["id"] = request_id
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}
