"""bench protocols: its gRPC request is what the server's codec reads."""

from __future__ import annotations

import numpy as np
import pytest

from bench.protocols import ProtocolsBenchError, ProtocolsConfig, _grpc_request
from runtime.grpc_server import http_form
from runtime.manifest import InputSpec, Preprocessing
from runtime.protocol import parse_infer_request


def test_the_grpc_request_carries_the_images_as_raw_contents() -> None:
    images = np.arange(2 * 16, dtype=np.uint8).reshape(2, 1, 4, 4)
    request = _grpc_request("tiny", images)
    spec = InputSpec(name="INPUT", shape=(1, 4, 4), accepted_dtypes=("UINT8", "FP32"),
                     preprocessing=Preprocessing(mean=(0.0,), std=(1.0,)))
    parsed = parse_infer_request(*http_form(request), spec, ["digit_class"], 64)
    np.testing.assert_array_equal(parsed.raw, images)


def test_config_is_validated(tmp_path) -> None:
    with pytest.raises(ProtocolsBenchError, match="not a bundle"):
        ProtocolsConfig(bundle=str(tmp_path))
    with pytest.raises(ProtocolsBenchError, match="clients"):
        ProtocolsConfig(clients=("smoke-signals",))
