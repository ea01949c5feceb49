"""Request fields are read with their protocol types; parser limits are client errors (400)."""

from __future__ import annotations

import json

import pytest

from runtime.config import ServerConfig
from runtime.errors import BadRequest, ConfigError
from runtime.manifest import InputSpec, Preprocessing
from runtime.protocol import HEADER_LENGTH, parse_infer_request

SPEC = InputSpec("INPUT", (1, 2, 2), ("UINT8", "FP32"), Preprocessing((0.5,), (0.25,)))
OUTPUTS = ["digit_logits", "digit_class", "reconstructed"]


def _body(data: object = None, parameters: dict | None = None, outputs: list | None = None,
          datatype: str = "UINT8") -> dict:
    request: dict = {"inputs": [{"name": "INPUT", "shape": [1, 1, 2, 2], "datatype": datatype,
                                 "data": [1, 2, 3, 4] if data is None else data}]}
    if parameters is not None:
        request["parameters"] = parameters
    if outputs is not None:
        request["outputs"] = outputs
    return request


def _parse(body: bytes | dict, header_length: str | None = None):  # noqa: ANN202
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_infer_request(raw, header_length, SPEC, OUTPUTS, max_batch_size=8)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"inputs": ' + b"1" * 5000 + b"}", "cannot read"),  # beyond Python's digit limit
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
])
def test_parser_limits_are_bad_requests(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        _parse(body)


@pytest.mark.parametrize("timeout", [10**400, 10**30, -5, 0, 1e300 * 10])
def test_timeouts_out_of_range_are_bad_requests(timeout: float) -> None:
    with pytest.raises(BadRequest, match="timeout_ms"):
        _parse(_body(parameters={"timeout_ms": timeout}))


def test_a_valid_timeout_is_read_in_seconds() -> None:
    assert _parse(_body(parameters={"timeout_ms": 250})).timeout_s == pytest.approx(0.25)
    assert _parse(_body(parameters={"timeout": 2_000_000})).timeout_s == pytest.approx(2.0)


@pytest.mark.parametrize("data", [[1, True, 3, 4], [[1, 2], [False, 4]], [True, True, True, True]])
def test_booleans_are_not_numbers(data: list) -> None:
    with pytest.raises(BadRequest, match="only numbers"):
        _parse(_body(data=data))


@pytest.mark.parametrize("value", ["false", "no", 0, 1, None, "true"])
def test_binary_flags_must_be_json_booleans(value: object) -> None:
    with pytest.raises(BadRequest, match="binary_data_output.*JSON boolean"):
        _parse(_body(parameters={"binary_data_output": value}))
    with pytest.raises(BadRequest, match="binary_data.*JSON boolean"):
        _parse(_body(outputs=[{"name": "digit_class", "parameters": {"binary_data": value}}]))


def test_binary_flags_true_and_false() -> None:
    assert _parse(_body(parameters={"binary_data_output": True})).binary_default is True
    parsed = _parse(_body(outputs=[{"name": "digit_class", "parameters": {"binary_data": False}}]))
    assert parsed.outputs == {"digit_class": False}


@pytest.mark.parametrize("length", ["1_18", "+118", " 118", "118 ", "1e2", "٣", "-1", "0x10"])
def test_header_length_is_digits_only(length: str) -> None:
    with pytest.raises(BadRequest, match=f"{HEADER_LENGTH} must be an integer"):
        _parse(_body(), header_length=length)


def test_header_length_digits_split_the_body() -> None:
    header = json.dumps(_body()).encode()
    assert _parse(header, header_length=str(len(header))).raw.shape == (1, 1, 2, 2)


def test_a_batch_larger_than_the_queue_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="--max-batch-size 64 exceeds --max-queue-size 16"):
        ServerConfig(bundle="b", max_batch_size=64, max_queue_size=16)


def _parse_for(body: dict, model: str = "tiny", version: str | None = None):  # noqa: ANN202
    return parse_infer_request(json.dumps(body).encode(), None, SPEC, OUTPUTS, 8, model, version)


@pytest.mark.parametrize(("fields", "version"), [
    ({"model_name": "tiny"}, None),  # the KServe SDK's REST client sends this
    ({"model_name": "tiny", "model_version": "1"}, None),
    ({"model_version": "1"}, "1"),
    ({"model_name": "tiny", "model_version": ""}, "1"),  # empty: the default version
])
def test_model_name_and_version_that_match_the_url_are_accepted(fields: dict,
                                                                 version: str | None) -> None:
    assert _parse_for({**fields, **_body()}, version=version).raw.shape == (1, 1, 2, 2)


@pytest.mark.parametrize(("fields", "version", "message"), [
    ({"model_name": "mnist"}, None, "'model_name' is 'mnist' but .* model 'tiny'"),
    ({"model_name": 7}, None, "'model_name' must be a string"),
    ({"model_version": "2"}, None, "'model_version' is '2' but .* version '1'"),
    ({"model_version": "1"}, "3", "'model_version' is '1' but .* version '3'"),
    ({"model_version": 1}, None, "'model_version' must be a string"),
    ({"model": "tiny"}, None, r"unknown request field\(s\) \['model'\]"),  # still strict
])
def test_model_name_and_version_that_differ_are_bad_requests(fields: dict, version: str | None,
                                                             message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        _parse_for({**fields, **_body()}, version=version)
