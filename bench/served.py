"""`python -m bench served [BUNDLE]`: the accuracy the server actually serves, per decode policy.

Coded serving answers a query exactly when its own worker's result is used and
approximately when it is reconstructed, so what a user gets depends on how often the
server decodes. For each decode policy and fault setting, the real server (coded mode)
answers the bundle's whole test split (`num_images` MNIST / Fashion-MNIST test images, one
binary batch-1 request each, `concurrency` closed-loop clients of this process) and the
answers are scored against the labels:

- policies: `paper` (decode as soon as any k results are in: `--systematic-grace-ms 0`),
  `learned` (the default: wait for a missing systematic result until its worker's learned
  bound, runtime/deadlines.py), `fixed-5ms` (`--systematic-grace-ms 5`);
- faults: `none`, and `straggler` (the paper's: one systematic worker of every group
  +`delay_ms`).

Reported per point: served accuracy, the reconstructed fraction, the accuracy of the
reconstructed answers, and the clients' p50 / p99 / p99.9 (closed loop from this process:
for tails under open-loop load see `bench latency --load-fractions`). The clean accuracy
(ONNX Runtime f + head on the host, no coding) is the reference: the issue's target is
served accuracy within 0.2 points of it without faults. JSON + PNG in
bench/results/serving/served{-tag}.*.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code
from bench.entry import bench_main, comma_list
from bench.errors import BenchError
from bench.machine import machine_info, machine_label
from bench.serverproc import ServerProcess
from bench.soakload import load_images, ort_reference
from bench.wrk import binary_body, infer_url
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import MANIFEST_NAME, RECONSTRUCTED_OUTPUT, class_output

logger = logging.getLogger(__name__)

POLICIES = {"paper": ["--systematic-grace-ms", "0"], "learned": [],
            "fixed-5ms": ["--systematic-grace-ms", "5"]}
FAULTS = ("none", "straggler")


class ServedBenchError(BenchError):
    """Invalid served-accuracy configuration."""


@dataclass
class ServedConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to serve, "N,K"; None = its first
    policies: tuple[str, ...] = tuple(POLICIES)
    faults: tuple[str, ...] = FAULTS
    num_images: int = 10000
    concurrency: int = 16
    delay_ms: float = 100.0
    seed: int = 0
    out_dir: str = "bench/results/serving"
    run_dir: str = "runs/bench/served"
    tag: str = ""

    def __post_init__(self) -> None:
        self.policies, self.faults = tuple(self.policies), tuple(self.faults)
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise ServedBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], ServedBenchError)
        if not self.policies or set(self.policies) - set(POLICIES):
            raise ServedBenchError(f"--policies must be a subset of {list(POLICIES)}")
        if not self.faults or set(self.faults) - set(FAULTS):
            raise ServedBenchError(f"--faults must be a subset of {list(FAULTS)}")
        if self.num_images < 1 or self.concurrency < 1 or self.delay_ms < 0:
            raise ServedBenchError("--num-images and --concurrency must be >= 1, --delay-ms >= 0")


def score(classes: np.ndarray, reconstructed: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Served accuracy, reconstructed fraction and the accuracy of reconstructed answers."""
    right = classes == labels
    out = {"accuracy": float(right.mean()), "reconstructed_fraction": float(reconstructed.mean())}
    out["reconstructed_accuracy"] = float(right[reconstructed].mean()) if reconstructed.any() else None
    return out


async def _serve_all(url: str, images: np.ndarray, concurrency: int, primary: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes [N], reconstructed [N], latency_ms [N]) for one request per image."""
    import aiohttp

    n = len(images)
    classes = np.full(n, -2, np.int64)
    flags = np.zeros(n, np.bool_)
    latency = np.zeros(n)
    next_index = iter(range(n))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in next_index:
            body = binary_body("INPUT", images[i:i + 1])
            t0 = time.perf_counter()
            async with session.post(url, data=body.data, headers=body.headers()) as response:
                payload = await response.read()
                if response.status != 200:
                    raise ServedBenchError(f"image {i}: HTTP {response.status}: {payload[:300]!r}")
            latency[i] = (time.perf_counter() - t0) * 1e3
            outputs = {o["name"]: o["data"] for o in json.loads(payload)["outputs"]}
            classes[i] = outputs[class_output(primary)][0]
            flags[i] = outputs[RECONSTRUCTED_OUTPUT][0]

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return classes, flags, latency


def run(config: ServedConfig) -> dict[str, Any]:
    m = load_code(config.bundle, config.coding)
    images, labels, source = load_images(m, config.num_images, config.seed)
    if labels is None:
        raise ServedBenchError(f"{config.bundle}: no labelled test split for its dataset ({source})")
    primary = m.heads[0].task
    clean = ort_reference(config.bundle, m, images)[primary].argmax(axis=1)
    clean_accuracy = float((clean == labels).mean())
    logger.info("clean accuracy (ONNX Runtime, no coding) on %d %s images: %.4f", len(images), source,
                clean_accuracy)
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    points = []
    for fault in config.faults:
        fault_args = [] if fault == "none" else [
            "--fault-delay-ms", str(config.delay_ms), "--fault-straggler-per-group", "--fault-seed",
            str(config.seed)]
        for policy in config.policies:
            args = ["--mode", "coded", *coding_server_args(config.coding), "--log-level", "WARNING",
                    *POLICIES[policy], *fault_args]
            with ServerProcess(config.bundle, args, run_dir / f"{policy}-{fault}.server.log") as srv:
                url = infer_url(srv.url, m.model_name)
                asyncio.run(_serve_all(url, images[:64], config.concurrency, primary))  # warm-up
                classes, flags, latency = asyncio.run(_serve_all(url, images, config.concurrency, primary))
            point = {"policy": policy, "fault": fault, "server_args": args,
                     **score(classes, flags, labels),
                     "latency_ms": {q: float(np.percentile(latency, float(q)))
                                    for q in ("50", "99", "99.9")}}
            point["accuracy_minus_clean_points"] = 100 * (point["accuracy"] - clean_accuracy)
            logger.info("%-9s %-9s accuracy %.4f (%+.2f points) reconstructed %.3f; p50 %.1f p99 %.1f "
                        "p99.9 %.1f ms", policy, fault, point["accuracy"], point["accuracy_minus_clean_points"],
                        point["reconstructed_fraction"], *point["latency_ms"].values())
            points.append(point)
    target = next((p for p in points if p["policy"] == "learned" and p["fault"] == "none"), None)
    record = {"benchmark": "served", "config": asdict(config), "machine": machine_info(),
              "code": m.code.label, "source": source, "clean_accuracy": clean_accuracy, "points": points,
              "target": None if target is None else {
                  "name": "no faults: served accuracy within 0.2 points of clean (learned policy)",
                  "value_points": target["accuracy_minus_clean_points"],
                  "met": bool(target["accuracy_minus_clean_points"] >= -0.2)},
              "run_dir": str(run_dir)}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{config.tag}" if config.tag else ""
    (out / f"served{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    _figure(record, out / f"served{suffix}.png")
    logger.info("target: %s; wrote %s", json.dumps(record["target"]), out / f"served{suffix}.json")
    return record


def _figure(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [f"{p['policy']}\n{p['fault']}" for p in record["points"]]
    left.bar(names, [100 * p["accuracy"] for p in record["points"]], color="tab:blue")
    left.axhline(100 * record["clean_accuracy"], color="k", ls="--", lw=1, label="clean (no coding)")
    lo = min(100 * p["accuracy"] for p in record["points"]) - 1
    left.set_ylim(lo, 100 * record["clean_accuracy"] + 0.5)
    left.set_ylabel("served accuracy (%)")
    left.legend(fontsize=8)
    right.bar(names, [p["latency_ms"]["99.9"] for p in record["points"]], color="tab:orange")
    right.set_ylabel("p99.9 latency (ms), closed loop")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"served accuracy per decode policy — {machine_label(record['machine'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_LIST_FLAGS = ("bundle", "policies", "faults")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench served", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=ServedConfig.bundle)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--faults", default=",".join(FAULTS))
    add_dataclass_flags(p, ServedConfig, skip=_LIST_FLAGS, helps={"coding": CODING_HELP})
    return p


def config_from_args(args: argparse.Namespace) -> ServedConfig:
    values = dataclass_values(ServedConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS})
    return ServedConfig(bundle=args.bundle, policies=comma_list(args.policies), faults=comma_list(args.faults),
                        **values)


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), config_from_args, run,
                      (ServedBenchError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
