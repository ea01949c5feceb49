"""`python -m bench accuracy`: degraded-mode accuracy of Coded-InvNet, ParM and ApproxIFER.

For each dataset and (n, k) setting, the TEST split is cut into disjoint k-tuples (seeded
permutation) and every method is scored:

- normal accuracy: the base classifier on every test image (no erasure);
- degraded accuracy vs labels / vs base: for every erasure pattern (a set of n-k failed
  workers), the queries whose output had to be rebuilt are predicted and compared with the
  true label and with the base model's own prediction; patterns are weighted equally.
  Coded-InvNet and ParM only rebuild erased systematic workers (patterns that erase parities
  only are skipped: nothing is rebuilt). ApproxIFER has no systematic workers: every one of
  the C(n, n-k) patterns is used and all k queries are rebuilt by Berrut interpolation
  (its "normal" row uses all n workers, which is still an approximation).

The scoring itself is `trainer.coded_eval` (the same code the training commands validate
with). Checkpoints are read from RUNS/<dataset>/{classifier,encoder_k<k>|encoder_n<n>_k<k>,
parm_k<k>}.pt (`trainer.runs`; `python -m trainer train-all` writes them) and must carry the
classifier's f_hash; a missing or stale one is reported as "not run".
Writes accuracy.json, accuracy.md, accuracy.png (like the paper's Fig. 5) and
encodings_<dataset>.png (like Fig. 4) into --out-dir (default bench/results/accuracy/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from kernels.configs import add_dataclass_flags
from trainer.errors import SettingError, TrainerError
from trainer.runs import DEFAULT_SETTINGS, classifier_path, encoder_path, parm_path
from trainer.runs import parse_setting as parse_run_setting

logger = logging.getLogger(__name__)

METHODS = ("Coded-InvNet", "ParM", "ApproxIFER")
# Degraded-mode accuracy (%) reported by Dinh & Lee (ICML 2021) for MNIST.
PAPER = {
    ("mnist", 11, 10): {"Coded-InvNet": 85.9, "ParM": 53.4, "Learning-a-code": 40.1},
    ("mnist", 4, 2): {"Coded-InvNet": 67.4},
    ("mnist", 6, 4): {"Coded-InvNet": 45.4},
}
NOT_RUN = "not run (CPU budget)"


class AccuracyBenchError(BenchError):
    """Bad benchmark configuration."""


@dataclass
class AccuracyConfig:
    datasets: list[str] = field(default_factory=lambda: ["mnist", "fashion-mnist"])
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))  # "n,k"
    runs_dir: str = "runs"
    out_dir: str = "bench/results/accuracy"
    max_groups: int = 0  # test groups per setting; 0 = the whole test split
    figure_setting: str = "5,4"
    seed: int = 0
    threads: int = 0
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for s in [*self.settings, self.figure_setting]:
            parse_setting(s)
        if self.max_groups < 0:
            raise AccuracyBenchError(f"max_groups must be >= 0 (0 = all), got {self.max_groups}")

    @property
    def setting_pairs(self) -> list[tuple[int, int]]:
        return [parse_setting(s) for s in self.settings]


def parse_setting(text: str) -> tuple[int, int]:
    """'n,k' -> (n, k) (`trainer.runs.parse_setting`), refused as this benchmark's error."""
    try:
        return parse_run_setting(text)
    except SettingError as exc:
        raise AccuracyBenchError(str(exc)) from exc


def run_dataset(config: AccuracyConfig, dataset: str) -> list[dict[str, Any]]:
    """One row per (setting, method) of one dataset; missing or stale checkpoints: 'not run'."""
    import torch

    from trainer.checkpoint import load_classifier, load_encoders, load_parm
    from trainer.coded_eval import evaluate_approxifer, evaluate_coded, evaluate_parm, make_groups
    from trainer.data import get_spec, load_split, normalize
    from trainer.models import primary_logits_fn

    runs = Path(config.runs_dir)
    rows: list[dict[str, Any]] = []
    cls_path = classifier_path(runs, dataset)

    def row(n: int, k: int, method: str, **values: Any) -> dict[str, Any]:
        paper = PAPER.get((dataset, n, k), {}).get(method)
        return {"dataset": dataset, "n": n, "k": k, "method": method, "paper_acc": paper, **values}

    if not cls_path.is_file():
        logger.warning("%s: no classifier at %s", dataset, cls_path)
        return [row(n, k, m, status=NOT_RUN) for n, k in config.setting_pairs for m in METHODS]
    model, ckpt = load_classifier(cls_path)
    f_hash = ckpt["f_hash"]
    base = primary_logits_fn(model)
    f = base.f
    head = base.head
    images_u8, labels_np = load_split(dataset, "test", config.data_dir)
    images = torch.from_numpy(normalize(images_u8, get_spec(dataset)))
    labels = torch.from_numpy(labels_np)
    with torch.no_grad():
        preds = torch.cat([base(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])
    normal = float((preds == labels).float().mean())
    logger.info("%s: base test accuracy %.4f (f_hash %s…)", dataset, normal, f_hash[:12])
    for n, k in config.setting_pairs:
        groups = make_groups(len(images), k, config.max_groups or None, config.seed)
        common = {"normal_acc": normal, "groups": len(groups)}
        # Coded-InvNet
        path = encoder_path(runs, dataset, n, k)
        if path.is_file():
            encoders, ek = load_encoders(path)
            if ek["f_hash"] != f_hash:
                rows.append(row(n, k, "Coded-InvNet", status=f"not run (stale: {path.name} trained on another f)"))
            else:
                t0 = time.perf_counter()
                res = evaluate_coded(f, head, encoders, images, labels, groups)
                rows.append(row(n, k, "Coded-InvNet", status="ok", acc_labels=res.acc_labels, acc_base=res.acc_base,
                                eval_s=time.perf_counter() - t0, train_time_s=ek["metrics"].get("train_time_s"),
                                checkpoint=str(path), train_command=ek.get("command"), **common))
        else:
            rows.append(row(n, k, "Coded-InvNet", status=NOT_RUN))
        # ParM: one parity model, so one erasure
        path = parm_path(runs, dataset, k)
        if n != k + 1:
            rows.append(row(n, k, "ParM", status="n/a (ParM has one parity: n = k + 1 only)"))
        elif path.is_file():
            parm, pk = load_parm(path)
            if pk["f_hash"] != f_hash:
                rows.append(row(n, k, "ParM", status=f"not run (stale: {path.name} trained on another base)"))
            else:
                t0 = time.perf_counter()
                res = evaluate_parm(base, parm, images, labels, groups)
                rows.append(row(n, k, "ParM", status="ok", acc_labels=res["acc_labels"], acc_base=res["acc_base"],
                                eval_s=time.perf_counter() - t0, train_time_s=pk["metrics"].get("train_time_s"),
                                checkpoint=str(path), train_command=pk.get("command"), **common))
        else:
            rows.append(row(n, k, "ParM", status=NOT_RUN))
        # ApproxIFER: training-free
        t0 = time.perf_counter()
        res = evaluate_approxifer(base, images, labels, groups, n)
        rows.append(row(n, k, "ApproxIFER", status="ok", acc_labels=res["acc_labels"], acc_base=res["acc_base"],
                        approx_normal_acc=res["normal_acc_labels"], eval_s=time.perf_counter() - t0,
                        train_time_s=0.0, **common))
        logger.info("%s (%d,%d): %s", dataset, n, k,
                    ", ".join(f"{r['method']} " + (f"{r['acc_labels']:.4f}" if "acc_labels" in r else r["status"])
                              for r in rows[-3:]))
    return rows


def encodings_figure(config: AccuracyConfig, dataset: str, path: Path) -> Path | None:
    """Fig. 4: x_1..x_k, ideal encoding, learned encoding, and x_hat_a = f^-1(decoded z_a)."""
    import torch

    from trainer.checkpoint import load_classifier, load_encoders
    from trainer.coded_eval import decode_embeddings
    from trainer.data import get_spec, load_split, normalize
    from trainer.ideal_data import ideal_targets

    n, k = parse_setting(config.figure_setting)
    runs = Path(config.runs_dir)
    enc_path = encoder_path(runs, dataset, n, k)
    cls_path = classifier_path(runs, dataset)
    if not cls_path.is_file() or not enc_path.is_file():
        return None
    model, ckpt = load_classifier(cls_path)
    encoders, ek = load_encoders(enc_path)
    if ek["f_hash"] != ckpt["f_hash"]:
        return None
    spec = get_spec(dataset)
    images_u8, _ = load_split(dataset, "test", config.data_dir)
    pick = np.random.default_rng(config.seed).choice(len(images_u8), k, replace=False)
    x = torch.from_numpy(normalize(images_u8[pick], spec))[None]  # (1, k, C, H, W)
    f = model.f.eval()
    coeffs = encoders.encoders[0].coefficients.new_tensor(encoders.config.coefficients)  # (R, k)
    with torch.no_grad():
        ideal, _ = ideal_targets(f, x, coeffs, 1e-5, 100)  # (1, R, C, H, W)
        learned = encoders(x)  # (1, R, C, H, W)
        z = f(x[0]).reshape(1, k, -1)
        emb = f(x[0][:1]).shape[1:]
        z_par = f(learned[0]).reshape(1, -1, z.shape[-1])
        recon = []
        for a in range(k):  # erase worker a (and, for n-k > 1, the highest parities that fit)
            erased = (a, *range(k + 1, n))
            missing, z_hat = decode_embeddings(coeffs, z, z_par, erased)
            x_hat, _ = f.inverse(z_hat[0, :1].reshape(1, *emb), tol=1e-5, max_iter=100, raise_on_failure=False)
            recon.append(x_hat[0])
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)

    def show(ax, img: torch.Tensor, title: str) -> None:
        pix = (img * std + mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow(pix, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.axis("off")

    plt = _plt()
    cols = k + 2
    fig, axes = plt.subplots(2, cols, figsize=(1.3 * cols, 3.4))
    for j in range(k):
        show(axes[0, j], x[0, j], f"x_{j + 1}")
        show(axes[1, j], recon[j], f"x̂_{j + 1} rebuilt")
    show(axes[0, k], ideal[0, 0], "ideal enc.")
    show(axes[0, k + 1], learned[0, 0], "learned enc.")
    axes[1, k].axis("off")
    axes[1, k + 1].axis("off")
    fig.suptitle(f"{dataset} ({n},{k}): inputs, parity 0 encodings, reconstructions f⁻¹(decoded)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def write_markdown(record: dict[str, Any], path: Path) -> None:
    lines = [
        "# Degraded-mode accuracy (test split)",
        "",
        f"Machine: {record['machine_label']}. Command: `{' '.join(record['command'])}`.",
        "Degraded = predictions rebuilt for erased workers, averaged over every erasure pattern "
        "(see bench/accuracy.py). Paper = Dinh & Lee, ICML 2021, MNIST.",
        "",
        "| dataset | (n,k) | method | normal acc | degraded acc (labels) | agreement with base | paper | "
        "train time (CPU) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        paper = "–" if r.get("paper_acc") is None else f"{r['paper_acc']:.1f} %"
        train = "–" if r.get("train_time_s") is None else f"{r['train_time_s'] / 60:.1f} min"
        normal = r.get("normal_acc")
        if r["method"] == "ApproxIFER" and "approx_normal_acc" in r:
            normal_s = f"{_fmt(normal)} (interp. {_fmt(r['approx_normal_acc'])})"
        else:
            normal_s = _fmt(normal)
        lines.append(
            f"| {r['dataset']} | ({r['n']},{r['k']}) | {r['method']} | {normal_s} | {_fmt(r.get('acc_labels'))} | "
            f"{_fmt(r.get('acc_base'))} | {paper} | {train} | {r['status']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def bar_figure(record: dict[str, Any], path: Path) -> Path:

    plt = _plt()
    datasets = list(dict.fromkeys(r["dataset"] for r in record["rows"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 3.6), squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = [r for r in record["rows"] if r["dataset"] == dataset]
        settings = list(dict.fromkeys((r["n"], r["k"]) for r in rows))
        labelled_paper = False
        for m, method in enumerate(METHODS):
            vals = [next((100 * r["acc_labels"] for r in rows if (r["n"], r["k"]) == s and r["method"] == method
                          and "acc_labels" in r), 0.0) for s in settings]
            ax.bar(np.arange(len(settings)) + (m - 1) * width, vals, width, label=method)
            for i, s in enumerate(settings):
                paper = PAPER.get((dataset, *s), {}).get(method)
                if paper is not None:
                    ax.plot(i + (m - 1) * width, paper, "k_", markersize=14, mew=2,
                            label=None if labelled_paper else "paper (Dinh & Lee)")
                    labelled_paper = True
        ax.set_xticks(np.arange(len(settings)), [f"({n},{k})" for n, k in settings])
        ax.set_ylim(0, 100)
        ax.set_ylabel("degraded-mode accuracy (%)")
        ax.set_title(f"{dataset} (test); bar = 0: not run", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(record["machine_label"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def run(config: AccuracyConfig, command: list[str]) -> dict[str, Any]:
    import torch

    from bench.machine import machine_info, machine_label

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    info = machine_info()
    t0 = time.perf_counter()
    rows = [r for dataset in config.datasets for r in run_dataset(config, dataset)]
    record = {"config": dataclasses.asdict(config), "command": command, "machine": info,
              "machine_label": machine_label(info), "rows": rows, "elapsed_s": time.perf_counter() - t0}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for dataset in config.datasets:
        fig = encodings_figure(config, dataset, out / f"encodings_{dataset}.png")
        if fig is not None:
            record.setdefault("figures", []).append(str(fig))
    (out / "accuracy.json").write_text(json.dumps(record, indent=2))
    write_markdown(record, out / "accuracy.md")
    bar_figure(record, out / "accuracy.png")
    logger.info("wrote %s/accuracy.{json,md,png} in %.0f s", out, record["elapsed_s"])
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, AccuracyConfig, helps={
        "settings": "'n,k' pairs", "max_groups": "test groups per setting (0 = all)",
        "figure_setting": "'n,k' of the Fig. 4 picture"})
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(AccuracyConfig(**vars(args)), ["python", "-m", "bench", "accuracy", *argv])
    except (BenchError, TrainerError) as exc:  # bad flags, or a checkpoint that cannot be read
        logger.error("%s", exc)
        return 2
    return 0
