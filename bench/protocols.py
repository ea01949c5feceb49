"""`python -m bench protocols [BUNDLE]`: KServe v2 over HTTP beside gRPC (unary, streaming).

One server (coded mode unless `--server-args` says otherwise) is driven in turn, closed
loop, by the same kind of client for each protocol, run as a separate process per point
(`python -m bench.protocols --client ...`) so the client never shares an interpreter with
this driver: `http` (aiohttp, binary tensors, keep-alive), `grpc` (grpc.aio unary
ModelInfer with raw_input_contents, the way tritonclient sends it) and `grpc-stream` (one
bidirectional ModelStreamInfer per client). The clients are Python on the same 2 cores,
so these are protocol *differences* at equal client cost, not the server's ceiling (that is
`bench throughput`, with wrk); the record keeps each client's CPU seconds. JSON in
bench/results/serving/protocols{-tag}.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code, refuse_coding_in
from bench.entry import bench_main, comma_list
from bench.errors import BenchError
from bench.machine import machine_info
from bench.serverproc import REPO_ROOT, ServerProcess
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import MANIFEST_NAME

logger = logging.getLogger(__name__)

CLIENTS = ("http", "grpc", "grpc-stream")


class ProtocolsBenchError(BenchError):
    """Invalid protocols-benchmark configuration, or a client that failed."""


@dataclass
class ProtocolsConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to serve, "N,K"; None = its first
    clients: tuple[str, ...] = CLIENTS
    batches: tuple[int, ...] = (1, 32)
    concurrency: int = 16
    duration_s: float = 8.0
    warmup_s: float = 1.5
    server_args: tuple[str, ...] = ()
    out_dir: str = "bench/results/serving"
    run_dir: str = "runs/bench/protocols"
    tag: str = ""

    def __post_init__(self) -> None:
        self.clients, self.batches = tuple(self.clients), tuple(int(b) for b in self.batches)
        self.server_args = tuple(self.server_args)
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise ProtocolsBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], ProtocolsBenchError)
        refuse_coding_in("--server-args", self.server_args, ProtocolsBenchError)
        if not self.clients or set(self.clients) - set(CLIENTS):
            raise ProtocolsBenchError(f"--clients must be a subset of {list(CLIENTS)}")
        if not self.batches or min(self.batches) < 1 or self.concurrency < 1:
            raise ProtocolsBenchError("--batches must be >= 1 and --concurrency >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ProtocolsBenchError("--duration-s must be > 0 and --warmup-s >= 0")


# -- the client processes -------------------------------------------------------------------------
async def _http_client(url: str, body: bytes, header_length: int, stop_at: float,
                       latencies: list[float]) -> None:
    import aiohttp

    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(header_length)}
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise ProtocolsBenchError(f"HTTP {response.status}")
            latencies.append(time.perf_counter() - t0)


def _grpc_request(model: str, images: np.ndarray) -> Any:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT", datatype="UINT8", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


async def _grpc_client(target: str, request: Any, stop_at: float, latencies: list[float],
                       stream: bool) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        if not stream:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await stub.ModelInfer(request)
                latencies.append(time.perf_counter() - t0)
            return
        call = stub.ModelStreamInfer()
        while time.perf_counter() < stop_at:  # one request in flight per stream (closed loop)
            t0 = time.perf_counter()
            await call.write(request)
            answer = await call.read()
            if answer.error_message:
                raise ProtocolsBenchError(answer.error_message)
            latencies.append(time.perf_counter() - t0)
        await call.done_writing()


def client_main(args: argparse.Namespace) -> int:
    """One measured point; prints one JSON line."""
    images = np.load(args.images)
    latencies: list[float] = []

    async def run(duration_s: float, record: list[float]) -> None:
        stop_at = time.perf_counter() + duration_s
        if args.client == "http":
            from bench.wrk import binary_body

            body = binary_body("INPUT", images)
            jobs = [_http_client(args.url, body.data, body.header_length, stop_at, record)
                    for _ in range(args.concurrency)]
        else:
            request = _grpc_request(args.model, images)
            jobs = [_grpc_client(args.target, request, stop_at, record, args.client == "grpc-stream")
                    for _ in range(args.concurrency)]
        await asyncio.gather(*jobs)

    asyncio.run(run(args.warmup_s, []))
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    asyncio.run(run(args.duration_s, latencies))
    wall_s = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    lat = np.array(latencies) * 1e3
    print(json.dumps({"requests": len(lat), "wall_s": wall_s,
                      "images_per_s": len(lat) * len(images) / wall_s,
                      "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                      "client_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}))
    return 0


# -- the driver -----------------------------------------------------------------------------------
def run(config: ProtocolsConfig) -> dict[str, Any]:
    from bench.soakload import load_images

    m = load_code(config.bundle, config.coding)
    images, _, _ = load_images(m, max(config.batches), seed=0)
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir.mkdir(parents=True, exist_ok=True)
    points = []
    args = [*coding_server_args(config.coding), "--log-level", "WARNING", *config.server_args]
    with ServerProcess(config.bundle, args, run_dir / "server.log") as srv:
        for batch in config.batches:
            path = run_dir / f"images-b{batch}.npy"
            np.save(path, images[:batch])
            for client in config.clients:
                argv = [sys.executable, "-m", "bench.protocols", "--client", client,
                        "--images", str(path), "--url", f"{srv.url}/v2/models/{m.model_name}/infer",
                        "--target", srv.grpc_url, "--model", m.model_name,
                        "--concurrency", str(config.concurrency), "--duration-s", str(config.duration_s),
                        "--warmup-s", str(config.warmup_s)]
                done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT,
                                      timeout=config.duration_s + config.warmup_s + 120)
                if done.returncode != 0:
                    raise ProtocolsBenchError(f"{client} client failed: {done.stderr[-1500:]}")
                point = {"client": client, "batch": batch, **json.loads(done.stdout.strip().splitlines()[-1])}
                logger.info("%-11s b=%-3d %7.0f images/s  p50 %6.1f  p99 %6.1f ms  client CPU %.1f s",
                            client, batch, point["images_per_s"], point["p50_ms"], point["p99_ms"],
                            point["client_cpu_s"])
                points.append(point)
    ratios = {}
    for batch in config.batches:
        at = {p["client"]: p for p in points if p["batch"] == batch}
        if "http" in at:
            ratios[str(batch)] = {c: at[c]["images_per_s"] / at["http"]["images_per_s"]
                                  for c in at if c != "http"}
    record = {"benchmark": "protocols", "config": asdict(config), "machine": machine_info(),
              "code": m.code.label, "points": points, "ratio_vs_http": ratios, "run_dir": str(run_dir)}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{config.tag}" if config.tag else ""
    (out / f"protocols{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    logger.info("gRPC / HTTP images/s: %s", json.dumps(ratios))
    return record


_LIST_FLAGS = ("bundle", "clients", "batches", "server_args")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench protocols", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=ProtocolsConfig.bundle)
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--server-args", default="", help="extra server flags, space separated")
    add_dataclass_flags(p, ProtocolsConfig, skip=_LIST_FLAGS, helps={"coding": CODING_HELP})
    return p


def _client_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.protocols --client")
    p.add_argument("--client", choices=CLIENTS, required=True)
    for name in ("images", "url", "target", "model"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--duration-s", type=float, required=True)
    p.add_argument("--warmup-s", type=float, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--client" in argv:
        return client_main(_client_parser().parse_args(argv))
    return bench_main(argv, build_parser(), config_from_args, run,
                      (ProtocolsBenchError, ValueError))


def config_from_args(args: argparse.Namespace) -> ProtocolsConfig:
    values = dataclass_values(ProtocolsConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS})
    return ProtocolsConfig(bundle=args.bundle, clients=comma_list(args.clients),
                           batches=comma_list(args.batches, int), server_args=tuple(args.server_args.split()),
                           **values)


if __name__ == "__main__":
    raise SystemExit(main())
