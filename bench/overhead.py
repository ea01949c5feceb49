"""`python -m bench overhead [BUNDLE]`: cost of coding next to the model itself.

1. Compute time of Enc, f, g (and ParM if present) of the bundle at `batch_size` (paper
   Fig. 7) with ONNX Runtime on CPU, and with the CUDA provider where it is available;
   Enc, ParM and k are those of the bundle's first code, or of `--coding N,K`.
   Enc at batch B means B parity images from B groups of k queries: input [B, k, C, H, W];
   Enc/f compares them at equal batch, Enc/f per query divides by k (one parity serves k).
2. Enc time against k (paper Fig. 8): encoders of the project's architectures
   (trainer.models.encoder: the UNetEncoder of `python -m trainer encoder --preset cpu`
   unless flags say otherwise; `--encoder-arch squeezed` for the SqueezedEncoder) for each k
   in `ks`, randomly initialised (time does not depend on the weights), exported to ONNX here
   with torch.onnx (opset 18, dynamic batch) and timed the same way.
3. Decode time per coding group against k, one erasure, embedding of the bundle's shape:
   one-shot `CodingScheme.decode` (all of it runs after the k-th result lands) versus
   `OnlineDecoder`: in all (k `add` calls + `finalize`) and on the critical path (the k-th
   `add` + `finalize`, the only part that runs after the last result lands).

Every number is the median over `repeats` timed runs after `warmup` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.codes import CODING_HELP, check_coding, load_code
from bench.errors import BenchError
from bench.machine import machine_info, machine_label, usable_cpu_count
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import BATCH_DIM, ENCODER_IO, F_FILE, F_IO, HEAD_IO, MANIFEST_NAME, PARM_IO

logger = logging.getLogger(__name__)


class OverheadBenchError(BenchError):
    """Invalid overhead-benchmark configuration."""


# trainer.models.encoder.ENCODER_ARCHS and SQUEEZE_FACTORS, repeated so that parsing flags
# does not import torch
ENCODER_ARCHS = ("unet", "squeezed")
SQUEEZE_FACTORS = (2, 4)


@dataclass
class OverheadConfig:
    bundle: str = "bundles/mnist-default"
    coding: str | None = None  # the bundle's code to time (Enc, ParM, k), "N,K"; None = its first
    batch_size: int = 256
    ks: tuple[int, ...] = (2, 4, 10)
    repeats: int = 20
    warmup: int = 3
    decode_repeats: int = 2000
    intra_op_threads: int = 0  # 0 = the CPUs this process may use
    # Enc vs k architecture: the encoder of `python -m trainer encoder --preset cpu`; the
    # encoder_<field> flags are `python -m trainer encoder --<field>` (unet or squeezed fields).
    encoder_arch: str = "unet"
    encoder_base_channels: int = 16
    encoder_depth: int = 2
    encoder_shared_levels: int = 1
    encoder_squeeze: int = 4
    encoder_width: int = 32
    encoder_blocks: int = 3
    encoder_query_layers: int = 1
    skip_encoder_export: bool = False
    # Also time an untrained f of these `python -m trainer classifier` presets (e.g. "paper"):
    # Enc/f depends on how heavy f is, and the shipped CPU f is far lighter than the paper's.
    reference_f_presets: tuple[str, ...] = ()
    seed: int = 0
    out_dir: str = "bench/results/overhead"
    tag: str = ""

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        self.reference_f_presets = tuple(self.reference_f_presets)
        if not (Path(self.bundle) / MANIFEST_NAME).is_file():
            raise OverheadBenchError(f"{self.bundle}: not a bundle (no {MANIFEST_NAME})")
        self.coding = check_coding(self.coding, [self.bundle], OverheadBenchError)
        for name in ("batch_size", "repeats", "decode_repeats"):
            if getattr(self, name) < 1:
                raise OverheadBenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.ks or min(self.ks) < 1:
            raise OverheadBenchError(f"--ks must be a non-empty list of k >= 1, got {list(self.ks)}")
        if self.warmup < 0 or self.intra_op_threads < 0:
            raise OverheadBenchError("--warmup and --intra-op-threads must be >= 0")
        if self.encoder_arch not in ENCODER_ARCHS:
            raise OverheadBenchError(f"--encoder-arch must be one of {list(ENCODER_ARCHS)}, got {self.encoder_arch!r}")


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in available]


def make_session(path: str | Path, provider: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])


def time_session(session, feeds: dict[str, np.ndarray], repeats: int, warmup: int) -> dict[str, float]:
    """Median/min/p90 wall time (ms) of session.run over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        session.run(None, feeds)
    times_ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times_ms.append((time.perf_counter() - t0) * 1e3)
    arr = np.array(times_ms)
    return {"median_ms": float(np.median(arr)), "min_ms": float(arr.min()),
            "p90_ms": float(np.percentile(arr, 90)), "repeats": repeats}


def bundle_components(config: OverheadConfig, provider: str, threads: int) -> dict[str, dict[str, Any]]:
    m = load_code(config.bundle, config.coding)
    rng = np.random.default_rng(config.seed)
    B, k = config.batch_size, m.coding.k
    x = rng.standard_normal((B, *m.input.shape)).astype(np.float32)  # (B, C, H, W)
    xg = rng.standard_normal((B, k, *m.input.shape)).astype(np.float32)  # (B, k, C, H, W)
    z = rng.standard_normal((B, *m.embedding_shape)).astype(np.float32)  # (B, *emb)
    root = Path(config.bundle)
    jobs: list[tuple[str, str, dict[str, np.ndarray]]] = [("f", m.f, {F_IO[0]: x})]
    jobs += [(f"enc_{e.row}", e.file, {ENCODER_IO[0]: xg}) for e in m.encoders]
    jobs += [(f"g_{h.task}", h.file, {HEAD_IO[0]: z}) for h in m.heads]
    if m.parm is not None:
        jobs.append(("parm", m.parm, {PARM_IO[0]: xg}))
    out = {}
    for name, rel, feeds in jobs:
        stats = time_session(make_session(root / rel, provider, threads), feeds, config.repeats, config.warmup)
        out[name] = {**stats, "file": rel}
        logger.info("%-10s %-22s median %8.2f ms per batch of %d", provider[:-17], name, stats["median_ms"], B)
    return out


def encoder_config(k: int, config: OverheadConfig, shape: tuple[int, ...]):
    """The (n=k+1, c=1/k) EncoderConfig the `--encoder-*` flags describe for images of `shape`."""
    from trainer.errors import EncoderConfigError
    from trainer.models.encoder import EncoderConfig

    try:
        return EncoderConfig(
            in_channels=shape[0], image_size=list(shape[1:]), k=k, coefficients=[[1.0 / k] * k],
            arch=config.encoder_arch, base_channels=config.encoder_base_channels, depth=config.encoder_depth,
            shared_levels=config.encoder_shared_levels, squeeze=config.encoder_squeeze, width=config.encoder_width,
            blocks=config.encoder_blocks, query_layers=config.encoder_query_layers)
    except EncoderConfigError as exc:
        raise OverheadBenchError(f"--encoder-* flags: {exc}") from exc


def export_encoder(k: int, config: OverheadConfig, shape: tuple[int, ...], path: Path) -> dict[str, Any]:
    import torch

    from trainer.models.encoder import make_encoder

    enc_config = encoder_config(k, config, shape)
    torch.manual_seed(config.seed)
    model = make_encoder(enc_config, 0).eval()
    x = torch.randn(2, k, *shape)
    torch.onnx.export(model, (x,), str(path), input_names=[ENCODER_IO[0]], output_names=[ENCODER_IO[1]],
                      dynamic_shapes={ENCODER_IO[0]: {0: torch.export.Dim(BATCH_DIM)}}, opset_version=18,
                      dynamo=True, external_data=False)
    params = sum(p.numel() for p in model.parameters())
    return {"source": f"{type(model).__name__}, random init, exported here",
            "encoder_config": enc_config.to_dict(), "parameters": int(params)}


def encoder_vs_k(config: OverheadConfig, shape: tuple[int, ...], provider: str, threads: int) -> list[dict]:
    rng = np.random.default_rng(config.seed)
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-enc-") as tmp:
        for k in config.ks:
            path = Path(tmp) / f"enc_k{k}.onnx"
            info = export_encoder(k, config, shape, path)
            xg = rng.standard_normal((config.batch_size, k, *shape)).astype(np.float32)
            stats = time_session(make_session(path, provider, threads), {ENCODER_IO[0]: xg}, config.repeats,
                                 config.warmup)
            out.append({"k": k, **stats, **info})
            logger.info("Enc k=%-3d median %8.2f ms per batch of %d", k, stats["median_ms"], config.batch_size)
    return out


def reference_f(config: OverheadConfig, preset: str, provider: str, threads: int) -> dict[str, Any]:
    """Time an untrained MNIST f of a trainer preset at batch_size (same exporter as bundles)."""
    import torch

    from bench.devbundle import export_module
    from trainer.models import InvertibleNet
    from trainer.train_classifier import preset_values

    torch.manual_seed(config.seed)
    f_cfg, _ = preset_values("mnist", preset)
    f = InvertibleNet(f_cfg).eval().folded()
    x = np.random.default_rng(config.seed).standard_normal((config.batch_size, *f_cfg.in_shape)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-f-") as tmp:
        path = export_module(f, tuple(f_cfg.in_shape), Path(tmp) / F_FILE, *F_IO)
        stats = time_session(make_session(path, provider, threads), {F_IO[0]: x}, config.repeats, config.warmup)
    logger.info("f preset %-6s median %8.2f ms per batch of %d", preset, stats["median_ms"], config.batch_size)
    return {"preset": preset, "f_config": f_cfg.to_dict(), **stats}


def _median_us(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, BLAS init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def decode_vs_k(config: OverheadConfig, embedding_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per coding group (n = k+1, c = 1/k), systematic worker 0 missing."""
    from kernels.coding import CodingScheme, OnlineDecoder

    rng = np.random.default_rng(config.seed)
    out = []
    for k in config.ks:
        scheme = CodingScheme.average(k)
        f = rng.standard_normal((k, *embedding_shape)).astype(np.float32)  # (k, *emb)
        parity = scheme.encode(f).astype(np.float32)  # (1, *emb)
        indices = [*range(1, k), k]  # every systematic but 0, then the parity
        results = np.concatenate([f[1:], parity])  # (k, *emb)
        decoded = scheme.decode(indices, results)
        err = float(np.abs(decoded - f).max())
        decoder = OnlineDecoder(scheme, embedding_shape)

        def online(decoder=decoder, indices=indices, results=results) -> np.ndarray:
            decoder.reset()
            for i, value in zip(indices, results, strict=True):
                decoder.add(i, value)
            return decoder.finalize()

        online_err = float(np.abs(online() - f).max())

        def last_arrival_us(decoder=decoder, indices=indices, results=results) -> float:
            """Critical path of online decoding: the k-th arrival's add + finalize, in µs."""
            times = []
            for _ in range(config.decode_repeats):
                decoder.reset()
                for i, value in zip(indices[:-1], results[:-1], strict=True):
                    decoder.add(i, value)
                t0 = time.perf_counter()
                decoder.add(indices[-1], results[-1])
                decoder.finalize()
                times.append(time.perf_counter() - t0)
            return float(np.median(times) * 1e6)

        row = {"k": k, "embedding_elements": math.prod(embedding_shape),
               "one_shot_us": _median_us(lambda s=scheme, i=indices, r=results: s.decode(i, r),
                                         config.decode_repeats),
               "online_us": _median_us(online, config.decode_repeats),
               "online_last_arrival_us": last_arrival_us(),
               "max_abs_err_one_shot": err, "max_abs_err_online": online_err}
        out.append(row)
        logger.info("decode k=%-3d one-shot %8.1f us, online %8.1f us in all, %8.1f us after the k-th arrival",
                    k, row["one_shot_us"], row["online_us"], row["online_last_arrival_us"])
    return out


def run(config: OverheadConfig) -> dict[str, Any]:
    info = machine_info()
    threads = config.intra_op_threads or usable_cpu_count()
    logger.info("overhead bench: %s; ORT intra-op threads %d", json.dumps(asdict(config)), threads)
    logger.info("machine: %s", machine_label(info))
    m = load_code(config.bundle, config.coding)
    if not config.skip_encoder_export:
        for k in config.ks:  # refuse bad --encoder-* flags before timing anything
            encoder_config(k, config, m.input.shape)
    record: dict[str, Any] = {"benchmark": "overhead", "config": asdict(config), "machine": info,
                              "ort_intra_op_threads": threads, "code": m.code.label,
                              "bundle_k_label": f"bundle k={m.coding.k}",
                              "bundle_provenance": m.provenance, "by_provider": {}}
    for provider in providers():
        comp = bundle_components(config, provider, threads)
        f_ms = comp["f"]["median_ms"]
        ratios = {name: round(c["median_ms"] / f_ms, 4) for name, c in comp.items() if name != "f"}
        record["by_provider"][provider] = {"components": comp, "ratio_to_f": ratios}
    cpu = record["by_provider"]["CPUExecutionProvider"]
    record["components"] = cpu["components"]
    record["ratio_to_f"] = cpu["ratio_to_f"]
    if config.skip_encoder_export:
        record["encoder_vs_k"] = []
    else:
        record["encoder_vs_k"] = encoder_vs_k(config, m.input.shape, "CPUExecutionProvider", threads)
        f_ms = cpu["components"]["f"]["median_ms"]
        for e in record["encoder_vs_k"]:
            e["ratio_to_bundle_f"] = round(e["median_ms"] / f_ms, 4)
            # one parity per k queries: Enc's share of the f work per query served
            e["ratio_to_bundle_f_per_query"] = round(e["median_ms"] / f_ms / e["k"], 4)
    record["reference_f"] = [reference_f(config, p, "CPUExecutionProvider", threads)
                             for p in config.reference_f_presets]
    for ref in record["reference_f"]:
        ref["enc_vs_k_over_this_f"] = {str(e["k"]): round(e["median_ms"] / ref["median_ms"], 4)
                                       for e in record["encoder_vs_k"]}
    record["decode_vs_k"] = decode_vs_k(config, m.embedding_shape)
    enc_ratios = [v for k_, v in record["ratio_to_f"].items() if k_.startswith("enc_")]
    record["targets"] = {
        "enc_over_f": enc_ratios,
        "enc_over_f_per_query": [round(r / m.coding.k, 4) for r in enc_ratios],
        "enc_over_f_within_3pct": bool(enc_ratios) and max(enc_ratios) <= 0.03,
        "enc_vs_k_max_over_min": (round(max(e["median_ms"] for e in record["encoder_vs_k"])
                                        / min(e["median_ms"] for e in record["encoder_vs_k"]), 3)
                                  if record["encoder_vs_k"] else None),
    }
    suffix = f"-{config.tag}" if config.tag else ""
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"overhead{suffix}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    from bench.plots import overhead_figure

    title = (f"Coding overhead, ONNX Runtime CPU, {threads} threads, batch {config.batch_size} — "
             f"{machine_label(info)}")
    if "UNTRAINED" in str(m.provenance.get("note")):
        title += " — UNTRAINED real-architecture bundle (timing only)"
    png = overhead_figure(record, out_dir / f"overhead{suffix}.png", title)
    logger.info("targets: %s", json.dumps(record["targets"]))
    logger.info("wrote %s and %s", json_path, png)
    return record


_LIST_FLAGS = ("bundle", "ks", "reference_f_presets")  # a positional and comma lists; the rest map 1:1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", default=OverheadConfig.bundle)
    p.add_argument("--ks", default="2,4,10", help="k values for Enc and decode vs k")
    p.add_argument("--reference-f-presets", default="", help="e.g. paper: also time an untrained f of that preset")
    add_dataclass_flags(p, OverheadConfig, skip=_LIST_FLAGS, helps={"coding": CODING_HELP},
                        choices={"encoder_arch": ENCODER_ARCHS, "encoder_squeeze": SQUEEZE_FACTORS})
    return p


def config_from_args(args: argparse.Namespace) -> OverheadConfig:
    values = dataclass_values(OverheadConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS})
    return OverheadConfig(bundle=args.bundle, ks=tuple(int(k) for k in args.ks.split(",") if k),
                          reference_f_presets=tuple(p for p in args.reference_f_presets.split(",") if p), **values)


def main(argv: list[str] | None = None) -> int:
    # INFO for our own loggers only: torch.onnx / onnxscript are chatty at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    try:
        config = config_from_args(build_parser().parse_args(argv))
    except (OverheadBenchError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    try:
        run(config)
    except OverheadBenchError as exc:  # --encoder-* flags that build no encoder for the bundle's images
        logger.error("%s", exc)
        return 2
    return 0
