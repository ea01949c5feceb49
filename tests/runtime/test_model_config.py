"""The protocol-neutral builders (runtime/model_config.py): each dict is exactly the JSON
mapping of its official protobuf message (parsed strictly, no ignored fields), and its
values come from the manifest, the config and the metrics."""

from __future__ import annotations

import json
import time

import pytest
from google.protobuf import json_format
from runtime_harness import TinyModel, server_config
from tritonclient.grpc import model_config_pb2, service_pb2

from runtime import model_config
from runtime.manifest import Manifest
from runtime.metrics import Metrics
from runtime.model_io import output_specs
from runtime.modes import MODES


def _strict(data: dict, message: object) -> object:
    return json_format.ParseDict(data, message)  # unknown fields raise ParseError


def _data_type(datatype: str) -> int:
    return model_config_pb2.DataType.Value(f"TYPE_{datatype}")


@pytest.mark.parametrize("overrides", [
    {},
    {"mode": "parm", "max_batch_size": 8, "max_queue_delay_ms": 3.5, "encoders_on_workers": False},
    {"mode": "uncoded", "max_queue_delay_ms": 0.25, "max_groups_per_call": 4},
], ids=["coded", "parm", "uncoded"])
def test_model_config_is_a_triton_model_config(tiny: TinyModel, overrides: dict) -> None:
    manifest = Manifest.load(tiny.bundle)
    config = server_config(tiny.bundle, **overrides)
    built = model_config.model_config(manifest, config)
    parsed = _strict(built, model_config_pb2.ModelConfig())
    assert json.loads(json.dumps(built)) == built  # plain JSON

    assert parsed.name == manifest.model_name
    assert parsed.backend and parsed.platform
    assert parsed.max_batch_size == config.max_batch_size
    (inp,) = parsed.input
    assert inp.name == manifest.input.name
    assert inp.data_type == _data_type("UINT8")
    assert list(inp.dims) == list(manifest.input.shape)  # per query: no batch dimension
    specs = output_specs(manifest)
    assert [o.name for o in parsed.output] == [s.name for s in specs] == manifest.output_names()
    for out, spec in zip(parsed.output, specs, strict=True):
        assert out.data_type == _data_type(spec.datatype)
        per_query = list(spec.shape[1:])
        if per_query:
            assert list(out.dims) == per_query and not out.HasField("reshape")
        else:  # a scalar per query, written as Triton does: dims [1] reshaped to []
            assert list(out.dims) == [1] and out.HasField("reshape")
            assert list(out.reshape.shape) == []
    assert parsed.dynamic_batching.max_queue_delay_microseconds == round(
        config.max_queue_delay_ms * 1000)
    assert list(parsed.dynamic_batching.preferred_batch_size) == [manifest.coding.k]
    (group,) = parsed.instance_group
    assert group.count == MODES[config.mode].pool_size(manifest)
    assert group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")

    params = {key: value.string_value for key, value in parsed.parameters.items()}
    coding = manifest.coding
    assert params["mode"] == config.mode
    assert int(params["n"]) == coding.n and int(params["k"]) == coding.k
    assert json.loads(params["coefficients"]) == [list(r) for r in coding.coefficients]
    assert json.loads(params["input_datatypes"]) == list(manifest.input.accepted_dtypes)
    assert json.loads(params["classes"]) == {h.task: list(h.classes) for h in manifest.heads}
    assert params["engine"] == config.engine
    assert json.loads(params["encoders_on_workers"]) is config.encoders_on_workers


def test_model_metadata_has_one_input_and_documents_the_other_dtype(tiny: TinyModel) -> None:
    manifest = Manifest.load(tiny.bundle)
    built = model_config.model_metadata(manifest, "coded")
    names = [i["name"] for i in built["inputs"]]
    assert names == [manifest.input.name]  # unique names: one input
    (inp,) = built["inputs"]
    assert inp["datatype"] == "UINT8"
    assert inp["shape"] == [-1, *manifest.input.shape]
    assert built["parameters"]["input_datatypes"] == {
        manifest.input.name: list(manifest.input.accepted_dtypes)}
    assert "FP32" in built["parameters"]["input_datatypes"][manifest.input.name]
    assert built["outputs"] == [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                                for s in output_specs(manifest)]
    params = built["parameters"]
    assert (params["n"], params["k"]) == (manifest.coding.n, manifest.coding.k)
    assert params["workers"] == MODES["coded"].pool_size(manifest)
    assert json.loads(json.dumps(built)) == built
    # everything but KServe's model-level `parameters` is the gRPC message, exactly
    grpc_form = {k: v for k, v in built.items() if k != "parameters"}
    parsed = _strict(grpc_form, service_pb2.ModelMetadataResponse())
    assert parsed.name == manifest.model_name and list(parsed.versions) == ["1"]
    assert [list(t.shape) for t in parsed.outputs] == [list(s.shape) for s in output_specs(manifest)]


def test_server_metadata_lists_every_extension() -> None:
    built = model_config.server_metadata()
    parsed = _strict(built, service_pb2.ServerMetadataResponse())
    for extension in ("binary_tensor_data", "parameters", "model_configuration", "statistics",
                      "model_repository"):
        assert extension in parsed.extensions
    assert len(set(parsed.extensions)) == len(parsed.extensions)


def _busy_metrics(model: str) -> Metrics:
    metrics = Metrics(model)
    metrics.request_success(0.004)
    metrics.request_success(0.006)
    metrics.request_failure("BadRequest", 0.001)
    metrics.group_executed(3, queue_s=0.0005, compute_s=0.002)
    metrics.group_executed(2, queue_s=0.0001, compute_s=0.001)
    metrics.queries_cancelled(2)
    metrics.reconstructed.labels(**metrics.labels).inc(1)
    metrics.erasures.labels(worker="1").inc()
    metrics.late_dropped.labels(worker="1").inc()
    metrics.redispatched.inc(3)
    metrics.partial_groups.labels(**metrics.labels).inc()
    metrics.padded_queries.labels(**metrics.labels).inc()
    return metrics


def test_model_statistics_is_a_triton_model_statistics(tiny: TinyModel) -> None:
    manifest = Manifest.load(tiny.bundle)
    empty = model_config.model_statistics(manifest, Metrics(manifest.model_name).snapshot())
    _strict({"model_stats": [empty]}, service_pb2.ModelStatisticsResponse())
    assert empty["inference_count"] == empty["execution_count"] == empty["last_inference"] == 0
    assert all(d == {"count": 0, "ns": 0} for d in empty["inference_stats"].values())

    before_ms = time.time() * 1000
    metrics = _busy_metrics(manifest.model_name)
    snapshot = metrics.snapshot()
    built = model_config.model_statistics(manifest, snapshot)
    response = _strict({"model_stats": [built]}, service_pb2.ModelStatisticsResponse())
    (stats,) = response.model_stats
    assert stats.name == manifest.model_name and stats.version == "1"
    assert stats.inference_count == 5 and stats.execution_count == 2
    assert before_ms - 1 <= stats.last_inference <= time.time() * 1000 + 1
    inference = stats.inference_stats
    assert inference.success.count == 2
    assert inference.success.ns == pytest.approx(10e6, rel=1e-6)
    assert inference.fail.count == 1 and inference.fail.ns == pytest.approx(1e6, rel=1e-6)
    assert inference.queue.count == 5 and inference.queue.ns == pytest.approx(0.6e6, rel=1e-6)
    assert inference.compute_infer.count == 2
    assert inference.compute_infer.ns == pytest.approx(3e6, rel=1e-6)

    coded = model_config.coded_statistics(snapshot)
    assert set(coded) == set(model_config.CODED_COUNTERS)
    assert coded["cancelled_queries"] == 2 and coded["redispatched_calls"] == 3
    assert coded["reconstructed"] == coded["erasures"] == coded["late_results_dropped"] == 1
    assert coded["padded_queries"] == coded["partial_groups"] == 1
    assert all(isinstance(v, int) for v in coded.values())


@pytest.mark.parametrize("ready", [True, False])
def test_repository_index_is_a_triton_index(tiny: TinyModel, ready: bool) -> None:
    manifest = Manifest.load(tiny.bundle)
    models = model_config.repository_index(manifest, ready, "" if ready else "warming up")
    response = _strict({"models": models}, service_pb2.RepositoryIndexResponse())
    (model,) = response.models
    assert model.name == manifest.model_name and model.version == "1"
    assert model.state == ("READY" if ready else "UNAVAILABLE")
    assert model.reason == ("" if ready else "warming up")
