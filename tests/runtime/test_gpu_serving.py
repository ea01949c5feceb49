"""The GPU path end to end (gpu): f on CUDA streams acting as workers (`--engine torch
--device cuda`, the shipped bundle's torch.export program), results left on the device with
their events, decoded by the persistent CUDA decoders (runtime.gpu_decode), real MNIST
requests, a worker killed under load. Run by bench/gpu_check.sh; skipped without a GPU.

No tritonclient here (the GPU check's machine has none): requests are KServe v2 JSON over
urllib, against 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from runtime_harness import DATA_ROOT, ServerThread, mnist_test, server_config

from kernels.coding import CodingScheme, OnlineDecoder
from runtime.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "mnist-default"
IMAGES = 400
BATCH = 8
CLIENTS = 4  # concurrent clients: dispatches overlap, so several decoders are leased at once

pytestmark = pytest.mark.gpu


def _infer(url: str, manifest: Manifest, images: np.ndarray) -> dict[str, np.ndarray]:
    body = {"inputs": [{"name": manifest.input.name, "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.reshape(-1).tolist()}]}
    request = urllib.request.Request(f"http://{url}/v2/models/{manifest.model_name}/infer",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        outputs = json.loads(response.read())["outputs"]
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in outputs}


def _serve(images: np.ndarray, **overrides: object) -> tuple[dict[str, np.ndarray], ServerThread]:
    manifest = Manifest.load(BUNDLE)
    config = server_config(BUNDLE, metrics_port=-1, grpc_port=-1, **overrides)
    with ServerThread(config, ready_timeout_s=300) as srv:
        batches = [images[s:s + BATCH] for s in range(0, len(images), BATCH)]
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda b: _infer(srv.url, manifest, b), batches))
    merged = {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}
    return merged, srv


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    root = DATA_ROOT / "mnist"
    if not root.is_dir():
        pytest.skip(f"MNIST test files not at {root} (set CODED_INVNET_DATA)")
    return mnist_test(root, IMAGES)


async def _decode_every_subset(decoders, scheme: CodingScheme, shape: tuple[int, ...], results: list,  # noqa: ANN001
                               host: np.ndarray, rng: np.random.Generator) -> None:
    for subset in itertools.combinations(range(scheme.n), scheme.k):
        decoder = decoders.acquire(shape)
        expected = OnlineDecoder(scheme, shape)
        for i in rng.permutation(subset):
            decoder.add(int(i), results[int(i)])
            expected.add(int(i), host[int(i)])
        got = await decoders.finalize(decoder)
        np.testing.assert_allclose(got, expected.finalize(), rtol=1e-4, atol=1e-4, err_msg=str(subset))
        decoders.release(decoder)


def test_device_decoders_match_the_host_decoder_for_every_erasure() -> None:
    torch = pytest.importorskip("torch")
    from runtime.gpu_decode import DeviceResult, make_device_decoders

    rng = np.random.default_rng(0)
    for scheme in (CodingScheme.average(4), CodingScheme.design(6, 4), CodingScheme.paper_4_2()):
        decoders = make_device_decoders(scheme)
        assert decoders is not None, "the CUDA decoder did not load (see the warning above)"
        shape = (3, 16, 7, 7)  # 3 groups of the shipped bundle's embedding
        values = rng.standard_normal((scheme.k, *shape)).astype(np.float32)
        host = np.concatenate([values, scheme.encode(values)])
        producer = torch.cuda.Stream()  # a worker's stream, not the decoder's
        results = []
        for row in host:
            with torch.cuda.stream(producer):
                tensor = torch.from_numpy(row).to("cuda", non_blocking=False) * 1.0  # made on `producer`
                event = torch.cuda.Event()
                event.record(producer)
            results.append(DeviceResult(tensor, event))
        asyncio.run(_decode_every_subset(decoders, scheme, shape, results, host, rng))
        assert decoders.built == 1  # one persistent decoder served every group
        decoders.close()


def test_uncoded_on_gpu_streams_answers_like_the_cpu_engine(mnist) -> None:
    images, labels = mnist
    cpu, _ = _serve(images, mode="uncoded")
    gpu, _ = _serve(images, mode="uncoded", engine="torch", device="cuda")
    np.testing.assert_allclose(gpu["digit_logits"], cpu["digit_logits"], atol=1e-3, rtol=0)
    assert float((gpu["digit_class"] == labels).mean()) >= 0.95


def test_coded_on_gpu_streams_survives_a_killed_worker_on_mnist(mnist) -> None:
    images, labels = mnist
    answers, srv = _serve(images, mode="coded", engine="torch", device="cuda",
                          fault_kill_worker=1, fault_kill_after_calls=3, fault_seed=0)
    engine = srv.server.engine
    assert engine._device_decoders is not None, "decoded on the host: the CUDA decoder did not load"
    assert engine._device_decoders.built >= 1
    flags = answers["reconstructed"].astype(bool).reshape(-1)
    assert len(flags) == IMAGES  # every request answered
    assert flags.any(), "worker 1 was killed: some answers must have been rebuilt"
    accuracy = float((answers["digit_class"].reshape(-1) == labels).mean())
    assert accuracy >= 0.93, f"accuracy {accuracy:.3f} with {int(flags.sum())} rebuilt answers"
    exact = ~flags
    cpu, _ = _serve(images, mode="uncoded")
    agree = float((answers["digit_class"].reshape(-1)[exact] == cpu["digit_class"].reshape(-1)[exact]).mean())
    assert agree >= 0.999, f"exact answers agree with the CPU engine on {agree:.4f}"
