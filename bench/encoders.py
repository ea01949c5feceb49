"""`python -m bench encoders CLASSIFIER ENCODER...`: the encoder Pareto front on one f.

For each trained encoder checkpoint (all trained against the same f):
1. degraded-mode accuracy (trainer.coded_eval.evaluate_coded: the whole test split in
   random groups, every erasure position), against the labels and against the base model;
2. cost: its Enc time over f's at equal batch (B groups vs B images, ONNX Runtime CPU, both
   exported here like `python -m export` does) at the k it was trained for, from its own
   weights, and at each of `--ks` from a randomly initialised encoder of the same design
   (time does not depend on the weights), so flatness in k is measured too.
The linear mix sum_j c_j x_j alone (no learned part: what every residual encoder starts
from) is scored beside them unless `--no-linear-baseline`. The record marks the Pareto
front (no other design is both cheaper and more accurate) and the knee: the most accurate
design whose Enc/f is within `--budget`. f is timed before and after the encoders and the
median of all its runs is used, so a drift of the machine shows in `f_spread`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.machine import machine_info, machine_label, usable_cpu_count
from bench.overhead import make_session, time_session
from kernels.configs import add_dataclass_flags, dataclass_values
from runtime.manifest import ENCODER_IO, F_IO

logger = logging.getLogger(__name__)


class EncodersBenchError(BenchError):
    """Bad configuration, or checkpoints that do not belong together."""


@dataclass
class EncodersConfig:
    classifier: str = ""
    encoders: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # one per encoder; default: the checkpoint's file stem
    batch_size: int = 256
    ks: tuple[int, ...] = (2, 4, 10)
    repeats: int = 10
    warmup: int = 3
    intra_op_threads: int = 0  # 0 = the CPUs this process may use
    max_groups: int = 0  # test groups; 0 = the whole test split
    budget: float = 0.10  # Enc/f at equal batch allowed for the knee
    linear_baseline: bool = True
    seed: int = 0
    data_dir: str | None = None
    out_dir: str = "bench/results/encoders"
    tag: str = ""

    def __post_init__(self) -> None:
        self.encoders, self.labels, self.ks = tuple(self.encoders), tuple(self.labels), tuple(self.ks)
        if not Path(self.classifier).is_file():
            raise EncodersBenchError(f"classifier checkpoint {self.classifier!r} not found")
        missing = [e for e in self.encoders if not Path(e).is_file()]
        if missing:
            raise EncodersBenchError(f"encoder checkpoint(s) not found: {missing}")
        if not self.encoders and not self.linear_baseline:
            raise EncodersBenchError("nothing to measure: give encoder checkpoints or keep the linear baseline")
        if self.labels and len(self.labels) != len(self.encoders):
            raise EncodersBenchError(f"--labels: {len(self.labels)} labels for {len(self.encoders)} encoders")
        for name in ("batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise EncodersBenchError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.ks or min(self.ks) < 1 or self.budget <= 0 or self.max_groups < 0:
            raise EncodersBenchError("--ks must be k >= 1, --budget > 0, --max-groups >= 0")


def linear_mix_encoders(coefficients: list[list[float]]):
    """x [B, k, C, H, W] -> [B, R, C, H, W] = sum_j C[r, j] x_j: no learned part."""
    import torch
    from torch import nn

    from trainer.models.encoder import linear_mix

    class LinearMix(nn.Module):
        def __init__(self, rows: list[list[float]]) -> None:
            super().__init__()
            self.register_buffer("c", torch.tensor(rows, dtype=torch.float32))  # (R, k)
            self.encoders = nn.ModuleList([_Row(self, r) for r in range(len(rows))])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bkchw,rk->brchw", x, self.c)

    class _Row(nn.Module):
        def __init__(self, parent: nn.Module, row: int) -> None:
            super().__init__()
            self.register_buffer("c", parent.c[row].clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return linear_mix(self.c, x)

    return LinearMix(coefficients).eval()


def pareto_front(points: list[dict[str, Any]], cost: str, value: str) -> list[str]:
    """Labels of the points no other point beats on both (cheaper or equal, and more accurate or equal)."""
    front = []
    for p in points:
        dominated = any(
            q is not p and q[cost] <= p[cost] and q[value] >= p[value] and (q[cost] < p[cost] or q[value] > p[value])
            for q in points
        )
        if not dominated:
            front.append(p["label"])
    return front


def knee(points: list[dict[str, Any]], cost: str, value: str, budget: float) -> str | None:
    """The most accurate design within the budget (None where none fits)."""
    within = [p for p in points if p[cost] <= budget]
    return max(within, key=lambda p: p[value])["label"] if within else None


class _Timer:
    """ONNX files timed at one batch on CPU; f is timed between designs so drift shows."""

    def __init__(self, config: EncodersConfig, tmp: Path, f_path: Path, shape: tuple[int, ...]) -> None:
        self.config, self.tmp, self.shape = config, tmp, shape
        self.threads = config.intra_op_threads or usable_cpu_count()
        self.rng = np.random.default_rng(config.seed)
        self.f_session = make_session(f_path, "CPUExecutionProvider", self.threads)
        self.f_runs: list[float] = []

    def time_f(self) -> float:
        x = self.rng.standard_normal((self.config.batch_size, *self.shape)).astype(np.float32)
        stats = time_session(self.f_session, {F_IO[0]: x}, self.config.repeats, self.config.warmup)
        self.f_runs.append(stats["median_ms"])
        return stats["median_ms"]

    def time_encoder(self, module: Any, k: int, name: str) -> float:
        from bench.devbundle import export_module

        path = export_module(module.eval(), (k, *self.shape), self.tmp / f"{name}.onnx", *ENCODER_IO)
        xg = self.rng.standard_normal((self.config.batch_size, k, *self.shape)).astype(np.float32)
        session = make_session(path, "CPUExecutionProvider", self.threads)
        return time_session(session, {ENCODER_IO[0]: xg}, self.config.repeats, self.config.warmup)["median_ms"]


def _design(ckpt: dict[str, Any]) -> dict[str, Any]:
    cfg = ckpt["model_config"]
    keys = ("arch", "squeeze", "width", "blocks", "query_layers") if cfg.get("arch") == "squeezed" else (
        "arch", "base_channels", "depth", "shared_levels")
    return {key: cfg.get(key, "unet") for key in keys}


def run(config: EncodersConfig, command: list[str] | None = None) -> dict[str, Any]:
    import torch

    from bench.devbundle import export_module
    from trainer.checkpoint import load_classifier, load_encoders
    from trainer.coded_eval import evaluate_coded, make_groups
    from trainer.data import get_spec, load_split, normalize
    from trainer.models import primary_logits_fn
    from trainer.models.encoder import EncoderConfig, make_encoder

    info = machine_info()
    logger.info("machine: %s", machine_label(info))
    model, cls_ckpt = load_classifier(config.classifier)
    base = primary_logits_fn(model)
    f, head = base.f, base.head
    dataset = cls_ckpt["dataset"]
    images_u8, labels_np = load_split(dataset, "test", config.data_dir)
    images = torch.from_numpy(normalize(images_u8, get_spec(dataset)))
    labels = torch.from_numpy(labels_np)
    shape = tuple(images.shape[1:])
    with torch.no_grad():
        preds = torch.cat([base(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])
    clean = float((preds == labels).float().mean())

    # (label, encoders module, coefficients (R, k), checkpoint or None, path or None)
    designs: list[tuple[str, Any, list[list[float]], dict[str, Any] | None, str | None]] = []
    for i, path in enumerate(config.encoders):
        encoders, ckpt = load_encoders(path)
        if ckpt["f_hash"] != cls_ckpt["f_hash"]:
            raise EncodersBenchError(f"{path} was trained against another f than {config.classifier}")
        label = config.labels[i] if config.labels else Path(path).stem
        designs.append((label, encoders, encoders.config.coefficients, ckpt, path))
    if config.linear_baseline:
        rows = designs[0][2] if designs else [[0.25] * 4]  # the first encoder's code, else (5,4)
        designs.insert(0, ("linear mix (no learned part)", linear_mix_encoders(rows), rows, None, None))

    points = []
    with tempfile.TemporaryDirectory(prefix="bench-encoders-") as tmp_name:
        tmp = Path(tmp_name)
        f_path = export_module(copy.deepcopy(f).eval(), shape, tmp / "f.onnx", *F_IO)
        timer = _Timer(config, tmp, f_path, shape)
        timer.time_f()
        for index, (label, encoders, rows, ckpt, path) in enumerate(designs):
            coefficients = torch.tensor(rows, dtype=torch.float32)
            R, k = coefficients.shape
            groups = make_groups(len(images), k, config.max_groups or None, config.seed)
            with torch.no_grad():
                result = evaluate_coded(f, head, encoders, images, labels, groups, coefficients=coefficients)
            f_ms = timer.time_f()
            enc_ms = timer.time_encoder(encoders.encoders[0], k, f"enc{index}")
            by_k = {}
            for kk in config.ks:
                if ckpt is None:
                    module = linear_mix_encoders([[1.0 / kk] * kk]).encoders[0]
                else:
                    cfg = EncoderConfig.from_dict({**ckpt["model_config"], "k": kk, "coefficients": [[1.0 / kk] * kk]})
                    torch.manual_seed(config.seed)
                    module = make_encoder(cfg, 0)
                by_k[str(kk)] = round(timer.time_encoder(module, kk, f"enc{index}_k{kk}") / f_ms, 4)
            params = 0 if ckpt is None else sum(p.numel() for p in encoders.encoders[0].parameters())
            point = {
                "label": label, "checkpoint": path, "design": None if ckpt is None else _design(ckpt),
                "parameters": int(params), "n": int(k + R), "k": int(k),
                "acc_labels": result.acc_labels, "acc_base": result.acc_base, "groups": result.groups,
                "enc_ms": enc_ms, "f_ms": f_ms, "enc_over_f": round(enc_ms / f_ms, 4),
                "enc_over_f_per_query": round(enc_ms / f_ms / k, 4), "enc_over_f_by_k": by_k,
                "k_flatness": round(max(by_k.values()) / min(by_k.values()), 3) if by_k else None,
                "train_time_s": None if ckpt is None else ckpt["metrics"].get("train_time_s"),
                "train_command": None if ckpt is None else ckpt.get("command"),
            }
            points.append(point)
            logger.info("%-32s acc %.4f (base %.4f)  Enc/f %.3f  by k %s", label, point["acc_labels"],
                        point["acc_base"], point["enc_over_f"], by_k)
        timer.time_f()
    f_runs = timer.f_runs
    record = {
        "benchmark": "encoders", "config": asdict(config), "command": command, "machine": info,
        "dataset": dataset, "classifier": config.classifier, "f_hash": cls_ckpt["f_hash"], "clean_acc": clean,
        "ort_intra_op_threads": timer.threads, "f_ms_median": float(np.median(f_runs)),
        "f_spread": round(max(f_runs) / min(f_runs), 3), "points": points,
        "pareto_front": pareto_front(points, "enc_over_f", "acc_labels"),
        "knee": knee(points, "enc_over_f", "acc_labels", config.budget),
    }
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{config.tag}" if config.tag else ""
    json_path = out_dir / f"encoders{suffix}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    png = figure(record, out_dir / f"encoders{suffix}.png")
    write_markdown(record, out_dir / f"encoders{suffix}.md")
    logger.info("Pareto front: %s; knee within Enc/f <= %g: %s", record["pareto_front"], config.budget, record["knee"])
    logger.info("wrote %s, %s", json_path, png)
    return record


def write_markdown(record: dict[str, Any], path: Path) -> None:
    k_cols = list(record["config"]["ks"])
    lines = [
        f"# Encoders on one f ({record['dataset']}, clean {record['clean_acc']:.2%}, f {record['f_ms_median']:.2f} ms "
        f"per batch of {record['config']['batch_size']})",
        "",
        f"Degraded accuracy: whole test split, every erasure position. Enc/f at equal batch, ONNX Runtime CPU, "
        f"{record['ort_intra_op_threads']} threads; f drift over the run {record['f_spread']}x. "
        f"Knee (most accurate with Enc/f <= {record['config']['budget']}): **{record['knee']}**.",
        "",
        "| design | params | degraded acc (labels) | vs base | Enc/f (trained k) | "
        + " | ".join(f"Enc/f k={k}" for k in k_cols) + " | k flatness | train s | Pareto |",
        "|---|---|---|---|---|" + "---|" * len(k_cols) + "---|---|---|",
    ]
    for p in record["points"]:
        on_front = "yes" if p["label"] in record["pareto_front"] else ""
        lines.append(
            f"| {p['label']} | {p['parameters']} | {p['acc_labels']:.4f} | {p['acc_base']:.4f} "
            f"| {p['enc_over_f']:.3f} | "
            + " | ".join(f"{p['enc_over_f_by_k'].get(str(k), float('nan')):.3f}" for k in k_cols)
            + f" | {p['k_flatness']} | {p['train_time_s'] or '-'} | {on_front} |"
        )
    path.write_text("\n".join(lines) + "\n")


def figure(record: dict[str, Any], path: Path) -> Path:
    from bench.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    points = record["points"]
    front = sorted((p for p in points if p["label"] in record["pareto_front"]), key=lambda p: p["enc_over_f"])
    ax.plot([p["enc_over_f"] for p in front], [100 * p["acc_labels"] for p in front], "-", color="tab:blue",
            alpha=0.5, label="Pareto front")
    for p in points:
        marker = "*" if p["label"] == record["knee"] else "o"
        ax.scatter(p["enc_over_f"], 100 * p["acc_labels"], marker=marker, s=120 if marker == "*" else 40,
                   color="tab:red" if marker == "*" else "tab:blue")
        ax.annotate(p["label"], (p["enc_over_f"], 100 * p["acc_labels"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    budget = record["config"]["budget"]
    ax.axvline(budget, color="grey", ls="--", lw=1, label=f"budget Enc/f = {budget}")
    ax.axhline(100 * record["clean_acc"], color="black", ls=":", lw=1, label=f"clean {record['clean_acc']:.2%}")
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xlabel("Enc / f at equal batch (ONNX Runtime CPU)")
    ax.set_ylabel("degraded accuracy, % (every erasure)")
    ax.set_title(f"Encoders on one f ({record['dataset']}): accuracy vs cost", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path)


_LIST_FLAGS = ("classifier", "encoders", "labels", "ks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench encoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("classifier", help="the classifier checkpoint (f and heads) every encoder was trained against")
    p.add_argument("encoders", nargs="*", help="encoder checkpoints (`python -m trainer encoder --out ...`)")
    p.add_argument("--labels", default="", help="comma-separated names, one per encoder (default: file stems)")
    p.add_argument("--ks", default="2,4,10", help="k values for Enc/f against k (flatness)")
    add_dataclass_flags(p, EncodersConfig, skip=_LIST_FLAGS)
    return p


def config_from_args(args: argparse.Namespace) -> EncodersConfig:
    values = dataclass_values(EncodersConfig, {k: v for k, v in vars(args).items() if k not in _LIST_FLAGS})
    return EncodersConfig(classifier=args.classifier, encoders=tuple(args.encoders),
                          labels=tuple(x for x in args.labels.split(",") if x),
                          ks=tuple(int(k) for k in args.ks.split(",") if k), **values)


def main(argv: list[str] | None = None) -> int:
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    try:
        config = config_from_args(build_parser().parse_args(argv))
        run(config, command=["python -m bench encoders", *(sys.argv[1:] if argv is None else argv)])
    except (EncodersBenchError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0
