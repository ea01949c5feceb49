"""`export trt` build logic against a stand-in `tensorrt` module (no TensorRT on the CPU machine).

The stand-in records what the builder was asked to do: one optimisation profile per worker
with the batch range of each input read from the real ONNX files, a timing cache loaded and
persisted, every parser error collected, plans keyed by compute capability and version,
and the manifest's `files` updated. The real build runs only in the gpu-marked test.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from export import tensorrt_build
from export.config import TrtConfig
from export.errors import TensorRTBuildError
from runtime.manifest import Manifest, verify_checksums

pytestmark = pytest.mark.mnist  # builds or reads bundles verified on real MNIST test images


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.inputs = flags, []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]


class _Error:
    def __init__(self, i: int) -> None:
        self.i = i

    def node(self) -> int:
        return self.i

    def code(self) -> str:
        return "UNSUPPORTED_NODE"

    def desc(self) -> str:
        return f"op number {self.i} is not supported"


def fake_tensorrt(version: str, fail_parse: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = {"profiles": [], "caches_loaded": [], "flags": []}

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Cache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            return self.blob + b"+"

    class Config:
        def __init__(self) -> None:
            self.profiles = []

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            self.workspace = size

        def create_timing_cache(self, blob: bytes) -> Cache:
            trt.calls["caches_loaded"].append(bytes(blob))
            return Cache(bytes(blob))

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def add_optimization_profile(self, profile: dict) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Profile(dict):
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> _Network:
            trt.calls["flags"].append(flags)
            return _Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: _Network, config: Config) -> bytes:
            trt.calls["profiles"].append(config.profiles)
            return json.dumps({"profiles": [{k: list(v) for k, v in p.items()} for p in config.profiles]}).encode()

    class OnnxParser:
        def __init__(self, network: _Network, logger: Logger) -> None:
            self.network, self.num_errors = network, 0

        def parse(self, model: bytes, path: str) -> bool:
            if fail_parse:
                self.num_errors = 2
                return False
            graph = onnx.load_from_string(model).graph
            for value in graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
                self.network.inputs.append(_Tensor(value.name, dims))
            return True

        def get_error(self, i: int) -> _Error:
            return _Error(i)

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    return trt


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    def install(version: str = "10.13.0", fail_parse: bool = False) -> types.ModuleType:
        trt = fake_tensorrt(version, fail_parse)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(tensorrt_build, "compute_capability", lambda device: (9, 0))
        return trt

    return install


def test_build_records_profiles_cache_and_manifest(
    fake_gpu: Callable[..., types.ModuleType], bundle_copy: Callable[[], Path]
) -> None:
    trt = fake_gpu("10.13.0")
    copy = bundle_copy()
    report = tensorrt_build.build_engines(TrtConfig(bundle=str(copy), workers=3, opt_batch=4, max_batch=32))
    assert report.engine_dir == "engines/sm90_trt10.13.0"
    assert report.engines["f.onnx"] == "engines/sm90_trt10.13.0/f.plan"
    assert report.engines["codes/n3k2/enc_0.onnx"] == "engines/sm90_trt10.13.0/codes/n3k2/enc_0.plan"
    assert set(report.engines) == {"f.onnx", "heads/digit.onnx", "heads/parity.onnx", "codes/n3k2/enc_0.onnx",
                                   "codes/n3k2/parm.onnx"}
    assert trt.calls["flags"] == [1 << 3] * 5  # TensorRT 10: strongly typed, precision from the ONNX
    plan = json.loads((copy / report.engines["codes/n3k2/enc_0.onnx"]).read_bytes())
    assert plan["profiles"] == [{"x": [[1, 2, 1, 28, 28], [4, 2, 1, 28, 28], [32, 2, 1, 28, 28]]}] * 3
    plan = json.loads((copy / report.engines["heads/digit.onnx"]).read_bytes())
    assert plan["profiles"][0] == {"z": [[1, 4, 14, 14], [4, 4, 14, 14], [32, 4, 14, 14]]}
    manifest = Manifest.load(copy)
    verify_checksums(copy, manifest)  # the plans are listed with their sha256
    assert set(report.engines.values()) <= set(manifest.files)
    cache = copy / "engines/sm90_trt10.13.0/timing.cache"
    assert cache.read_bytes() == b"+"  # empty cache, extended by the (fake) build, persisted
    tensorrt_build.build_engines(TrtConfig(bundle=str(copy)))
    assert trt.calls["caches_loaded"] == [b"", b"+"]  # the second build starts from the saved cache


def test_tensorrt_11_gets_no_strongly_typed_flag(
    fake_gpu: Callable[..., types.ModuleType], bundle_copy: Callable[[], Path]
) -> None:
    trt = fake_gpu("11.4.0")
    report = tensorrt_build.build_engines(TrtConfig(bundle=str(bundle_copy())))
    assert report.engine_dir == "engines/sm90_trt11.4.0"
    assert trt.calls["flags"] == [0] * 5


def test_all_parser_errors_are_collected(
    fake_gpu: Callable[..., types.ModuleType], bundle_copy: Callable[[], Path]
) -> None:
    fake_gpu("10.13.0", fail_parse=True)
    copy = bundle_copy()
    with pytest.raises(TensorRTBuildError, match=r"(?s)rejected f\.onnx with 2 error\(s\).*\[0\] node 0.*\[1\] node 1"):
        tensorrt_build.build_engines(TrtConfig(bundle=str(copy)))
    assert not (copy / "engines").exists() or not any((copy / "engines").rglob("*.plan"))


def test_unsupported_tensorrt_version_is_refused(
    fake_gpu: Callable[..., types.ModuleType], bundle_copy: Callable[[], Path]
) -> None:
    fake_gpu("8.6.1")
    with pytest.raises(tensorrt_build.TensorRTUnavailableError, match="TensorRT 8.6.1 is not supported"):
        tensorrt_build.build_engines(TrtConfig(bundle=str(bundle_copy())))


def test_cuda_check_raises_on_error_status() -> None:
    assert tensorrt_build.cuda_check((0, 7), "cudaGetDeviceCount") == 7
    with pytest.raises(TensorRTBuildError, match=r"cudaGetDeviceCount failed .*code 100"):
        tensorrt_build.cuda_check((100, 0), "cudaGetDeviceCount")


@pytest.mark.gpu
def test_real_tensorrt_build(bundle_copy: Callable[[], Path]) -> None:
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    copy = bundle_copy()
    report = tensorrt_build.build_engines(TrtConfig(bundle=str(copy), workers=2, max_batch=16))
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for plan in report.engines.values():
        engine = runtime.deserialize_cuda_engine((copy / plan).read_bytes())
        assert engine is not None and engine.num_optimization_profiles == 2, plan
    verify_checksums(copy, Manifest.load(copy))
