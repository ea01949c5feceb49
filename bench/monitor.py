"""`python -m bench monitor [BUNDLE]`: the live decode-quality monitor (runtime/shadow.py)
watching real traffic shift away from the training data.

1. Offline reference: over the coding groups of the bundle's test split as the live phase
   sends them (runs of k consecutive images; and, beside it, `offline_groups` groups of k
   random images, as `bench accuracy` draws them), each query's embedding from f (ONNX
   Runtime), each parity f(Enc_r(x)), one random systematic slot per group rebuilt from
   the others and the first parity (kernels.coding) and classified: the share whose class
   agrees with the exact answer's (the degraded-mode agreement with the base model, one
   erasure), with its 95 % Wilson interval.
2. Live: the real server (coded, `--shadow-decode-fraction fraction`) answers the test
   split (`in_images`, one binary batch-1 request each, `concurrency` clients), then
   `shift_images` images of `shift_dataset` (Fashion-MNIST for an MNIST bundle), while the
   statistics endpoint is read every `poll_s`: the windowed agreement per head against the
   number of shadow decodes, and when the alert (`--shadow-alert-below`) fires.
3. Cost: wrk throughput (coded, batch-1 binary requests) with the server's default
   fraction against the monitor off (`--shadow-decode-fraction 0`), in the same run:
   `throughput_rounds` alternating pairs, medians compared.

Targets (reported, never asserted): the offline figure inside the 95 % interval of the
monitor's estimate over the in-distribution phase; the alert fired within `detect_within`
(500) shadow decodes of the shift; throughput cost of the default fraction <= 3 %.
The code measured (offline and live) is the bundle's first, or `--coding N,K`.
JSON + PNG in bench/results/monitor/monitor{-tag}.*.
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

from bench.codes import CODING_HELP, check_coding, coding_server_args, load_code, refuse_coding_in
from bench.entry import bench_main
from bench.errors import BenchError
from bench.machine import machine_info, machine_label
from bench.serverproc import ServerProcess, free_port
from bench.soakload import load_images
from bench.wrk import binary_body, infer_url, run_wrk
from kernels.configs import add_dataclass_flags
from runtime.manifest import MANIFEST_NAME, Manifest

logger = logging.getLogger(__name__)


class MonitorBenchError(BenchError):
    """Invalid monitor-benchmark configuration."""


@dataclass
class MonitorConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to serve and rebuild with, "N,K"; None = its first
    shift_dataset: str = "fashion-mnist"
    in_images: int = 10000
    shift_images: int = 4000
    fraction: float = 0.5  # shadow fraction of the live phases (the default's is timed in 3)
    concurrency: int = 8
    poll_s: float = 0.25
    offline_groups: int = 3000
    throughput_duration_s: int = 10
    throughput_rounds: int = 3  # alternating (default, off) pairs; the medians are compared
    connections: int = 16
    detect_within: int = 500  # target: the alert within this many shadow decodes of the shift
    server_args: tuple[str, ...] = ()  # extra flags of the live server
    seed: int = 0
    out_dir: str = "bench/results/monitor"
    run_dir: str = "runs/bench/monitor"
    tag: str = ""

    def __post_init__(self) -> None:
        self.server_args = tuple(self.server_args)
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise MonitorBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], MonitorBenchError)
        refuse_coding_in("--server-args", self.server_args, MonitorBenchError)
        if not 0.0 < self.fraction <= 1.0:
            raise MonitorBenchError(f"--fraction must be in (0, 1], got {self.fraction}")
        for name in ("in_images", "shift_images", "concurrency", "offline_groups",
                     "throughput_duration_s", "throughput_rounds", "connections", "detect_within"):
            if getattr(self, name) < 1:
                raise MonitorBenchError(f"--{name.replace('_', '-')} must be >= 1")


# -- 1. offline ----------------------------------------------------------------------------------
def offline_agreement(bundle: str, m: Manifest, images: np.ndarray, groups: int, seed: int,
                      consecutive: bool = False) -> dict[str, Any]:
    """Per head: the share of rebuilt-from-parity answers (one random slot per group) whose
    class agrees with the exact answer's, and its Wilson interval. Groups of k random
    images, or with `consecutive` the first `groups` runs of k consecutive images, as
    traffic sent in the split's order is grouped."""
    from kernels.coding import CodingScheme
    from runtime.config import ServerConfig
    from runtime.model_io import preprocess
    from runtime.models import ModelFactory
    from runtime.shadow import rebuild_slot, wilson_interval

    factory = ModelFactory(Path(bundle), m, ServerConfig(bundle=bundle))
    f, heads, encoders = factory.f(0), factory.heads(), factory.encoders()
    scheme = CodingScheme.from_dict(m.coding.to_dict())
    k = m.coding.k
    rng = np.random.default_rng(seed)
    if consecutive:
        groups = min(groups, len(images) // k)
        pick = np.arange(groups * k).reshape(groups, k)  # [G, k]
    else:
        pick = np.stack([rng.choice(len(images), k, replace=False) for _ in range(groups)])
    slots = rng.integers(0, k, groups)
    x = preprocess(images, m.input)
    z = np.concatenate([f.run(x[i:i + 500]) for i in range(0, len(x), 500)])  # [N, *emb]
    grouped = x[pick]  # [G, k, C, H, W]
    parity = np.concatenate([f.run(encoders[0].run(grouped[i:i + 250]))
                             for i in range(0, groups, 250)])  # [G, *emb]
    agree: dict[str, list[bool]] = {t: [] for t in heads}
    for s in range(k):
        rows = np.flatnonzero(slots == s)
        if not len(rows):
            continue
        exact_slots = [z[pick[rows, i]] for i in range(k)]
        rebuilt = rebuild_slot(scheme, exact_slots, s, k, parity[rows]).astype(np.float32)
        exact = z[pick[rows, s]]
        for task, head in heads.items():
            agree[task] += list(head.run(rebuilt).argmax(axis=1) == head.run(exact).argmax(axis=1))
    out = {}
    for task, values in agree.items():
        low, high = wilson_interval(int(sum(values)), len(values))
        out[task] = {"agreement": float(np.mean(values)), "interval_95": [low, high],
                     "compared": len(values)}
    return out


# -- 2. live -------------------------------------------------------------------------------------
async def _traffic(url: str, stats_url: str, metrics_url: str, phases: list[tuple[str, np.ndarray]],
                   concurrency: int, poll_s: float, primary: str) -> dict[str, Any]:
    import aiohttp

    from bench.served import _serve_all  # its clients: one binary batch-1 request per image

    series: list[dict[str, Any]] = []
    marks: dict[str, Any] = {}
    phase_name = phases[0][0]
    done = asyncio.Event()

    async def poll(session: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            async with session.get(stats_url) as response:
                shadow = (await response.json())["model_stats"][0]["coded"]["shadow"]
            point = {"t_s": round(time.perf_counter() - t0, 3), "phase": phase_name,
                     "decodes": shadow["decodes"], "alert": shadow["alert"],
                     "heads": {h: v["agreement"] for h, v in shadow["heads"].items()}}
            series.append(point)
            if shadow["alert"] and phase_name == phases[0][0]:
                marks.setdefault("false_alarms", []).append(point)  # on in-distribution traffic
            elif shadow["alert"] and "alert" not in marks:
                marks["alert"] = point
            await asyncio.sleep(poll_s)

    async def cumulative(session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(metrics_url) as response:
            text = await response.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            for name in ("coded_shadow_agreements_total", "coded_shadow_compared_total"):
                if line.startswith(name + "{"):
                    head = line.split('head="')[1].split('"')[0]
                    out[f"{name}:{head}"] = float(line.rsplit(" ", 1)[1])
            for name in ("coded_partial_groups_total", "nv_inference_exec_count"):
                if line.startswith(name + "{"):  # how many dispatches had a padded group
                    out[name] = float(line.rsplit(" ", 1)[1])
        return out

    async with aiohttp.ClientSession() as session:
        poller = asyncio.create_task(poll(session))
        per_phase = {}
        for name, images in phases:
            phase_name = name
            before = await cumulative(session)
            marks.setdefault("phases", []).append({"phase": name, "decodes_at_start":
                                                   series[-1]["decodes"] if series else 0})
            await _serve_all(url, images, concurrency, primary)
            await asyncio.sleep(1.0)  # the last shadow jobs run
            after = await cumulative(session)
            per_phase[name] = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
        done.set()
        await poller
    return {"series": series, "marks": marks, "cumulative": per_phase}


def _estimate(counts: dict[str, float], head: str) -> dict[str, Any]:
    from runtime.shadow import wilson_interval

    agree = int(counts.get(f"coded_shadow_agreements_total:{head}", 0))
    total = int(counts.get(f"coded_shadow_compared_total:{head}", 0))
    low, high = wilson_interval(agree, total)
    return {"agreement": agree / total if total else None, "interval_95": [low, high],
            "compared": total}


# -- 3. cost -------------------------------------------------------------------------------------
def _throughput(config: MonitorConfig, m: Manifest, images: np.ndarray, fraction: float | None,
                run_dir: Path) -> dict[str, Any]:
    args = ["--mode", "coded", *coding_server_args(config.coding), "--log-level", "WARNING"]
    if fraction is not None:
        args += ["--shadow-decode-fraction", str(fraction)]
    label = "default" if fraction is None else f"fraction-{fraction:g}"
    body = binary_body("INPUT", images[:1])
    with ServerProcess(config.bundle, args, run_dir / f"throughput-{label}.server.log") as srv:
        url = infer_url(srv.url, m.model_name)
        run_wrk(url, body, run_dir, connections=config.connections, duration_s=2)  # warm-up
        result = run_wrk(url, body, run_dir, connections=config.connections,
                         duration_s=config.throughput_duration_s)
    logger.info("throughput, shadow %s: %.0f requests/s", label, result.requests_per_s)
    return {"server_args": args, "requests_per_s": result.requests_per_s, "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms}


def run(config: MonitorConfig) -> dict[str, Any]:
    from trainer.data import load_split

    m = load_code(config.bundle, config.coding)
    images, labels, source = load_images(m, config.in_images, config.seed)
    if labels is None:
        raise MonitorBenchError(f"{config.bundle}: no labelled test split for its dataset ({source})")
    shifted, _ = load_split(config.shift_dataset, "test")
    shifted = shifted[:config.shift_images]
    run_dir = Path(config.run_dir) / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    logger.info("monitor bench on %s: %s", machine_label(info), json.dumps(asdict(config)))

    # as served: the live traffic sends the split in order, so its groups are runs of
    # consecutive images (neighbouring MNIST test images are more alike, which rebuilds
    # worse than random groups: both are recorded)
    offline = offline_agreement(config.bundle, m, images, len(images) // m.coding.k, config.seed,
                                consecutive=True)
    offline_random = offline_agreement(config.bundle, m, images, config.offline_groups, config.seed)
    logger.info("offline agreement (%s): groups as served %s, random groups %s", source,
                {h: round(v["agreement"], 4) for h, v in offline.items()},
                {h: round(v["agreement"], 4) for h, v in offline_random.items()})

    metrics_port = free_port()
    args = ["--mode", "coded", *coding_server_args(config.coding), "--log-level", "WARNING", "--shadow-decode-fraction",
            str(config.fraction), "--metrics-port", str(metrics_port), "--fault-seed", str(config.seed),
            *config.server_args]
    with ServerProcess(config.bundle, args, run_dir / "live.server.log") as srv:
        live = asyncio.run(_traffic(
            infer_url(srv.url, m.model_name), f"{srv.url}/v2/models/{m.model_name}/stats",
            f"http://127.0.0.1:{metrics_port}/metrics",
            [(source, images), (f"{config.shift_dataset} test split", shifted)],
            config.concurrency, config.poll_s, m.heads[0].task))
    primary = m.heads[0].task
    estimate = _estimate(live["cumulative"][source], primary)
    phases = live["marks"]["phases"]
    shift_decodes = phases[1]["decodes_at_start"]
    alert = live["marks"].get("alert")
    false_alarms = live["marks"].get("false_alarms", [])
    detected_after = None if alert is None else alert["decodes"] - shift_decodes

    # alternating rounds: a slow spell of the shared machine hits both settings alike
    rounds = [(_throughput(config, m, images, None, run_dir), _throughput(config, m, images, 0.0, run_dir))
              for _ in range(config.throughput_rounds)]
    default = {"rounds": [r[0] for r in rounds],
               "median_requests_per_s": float(np.median([r[0]["requests_per_s"] for r in rounds]))}
    off = {"rounds": [r[1] for r in rounds],
           "median_requests_per_s": float(np.median([r[1]["requests_per_s"] for r in rounds]))}
    cost = 1.0 - default["median_requests_per_s"] / off["median_requests_per_s"]

    low, high = estimate["interval_95"]
    offline_primary = offline[primary]["agreement"]
    targets = {
        "estimate_within_interval_of_offline": {
            "monitor": estimate, "offline": offline[primary],
            "met": bool(low <= offline_primary <= high)},
        f"alert_within_{config.detect_within}_decodes_of_the_shift_and_none_before": {
            "decodes_after_shift": detected_after, "false_alarm_polls": len(false_alarms),
            "met": not false_alarms and detected_after is not None
            and detected_after <= config.detect_within},
        "throughput_cost_of_the_default_fraction_at_most_3_percent": {
            "cost": round(cost, 4), "met": bool(cost <= 0.03)},
    }
    record = {"benchmark": "monitor", "config": asdict(config), "machine": info, "code": m.code.label,
              "source": source,
              "offline": offline, "offline_random_groups": offline_random, "live": live,
              "shift_at_decodes": shift_decodes,
              "throughput": {"default": default, "off": off}, "targets": targets,
              "run_dir": str(run_dir)}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{config.tag}" if config.tag else ""
    (out / f"monitor{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    _figure(record, primary, out / f"monitor{suffix}.png")
    for name, target in targets.items():
        logger.info("target %s: %s", name, json.dumps(target))
    logger.info("wrote %s", out / f"monitor{suffix}.json")
    return record


def _figure(record: dict[str, Any], primary: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [p for p in record["live"]["series"] if p["heads"].get(primary) is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for head in series[0]["heads"] if series else []:
        ax.plot([p["decodes"] for p in series], [p["heads"][head] for p in series], label=head)
    ax.axvline(record["shift_at_decodes"], color="grey", ls="--", label="traffic shifts")
    alert = record["live"]["marks"].get("alert")
    if alert is not None:
        ax.axvline(alert["decodes"], color="red", ls=":", label="alert fired")
    offline = record["offline"][primary]
    ax.axhspan(*offline["interval_95"], color="green", alpha=0.15,
               label=f"offline {primary} agreement (95 %)")
    ax.set_xlabel("shadow decodes")
    ax.set_ylabel("windowed class agreement")
    ax.set_title(f"decode-quality monitor: {record['source']} then "
                 f"{record['config']['shift_dataset']}, {machine_label(record['machine'])}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench monitor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=MonitorConfig.bundle)
    p.add_argument("--server-args", default="", help="extra flags of the live server, space separated")
    add_dataclass_flags(p, MonitorConfig, skip=("bundle", "server_args"), helps={"coding": CODING_HELP})
    return p


def config_from_args(args: argparse.Namespace) -> MonitorConfig:
    values = {k: v for k, v in vars(args).items() if v is not None and k != "server_args"}
    return MonitorConfig(**values, server_args=tuple(args.server_args.split()))


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, build_parser(), config_from_args, run, (MonitorBenchError,))
