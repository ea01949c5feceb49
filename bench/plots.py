"""PNG figures for the serving benchmarks (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Fixed colours per mode so every figure reads the same.
MODE_COLORS = {
    "reference": "black",
    "coded-clean": "tab:cyan",
    "uncoded": "tab:red",
    "replication": "tab:orange",
    "parm": "tab:purple",
    "approxifer": "tab:brown",
    "coded": "tab:blue",
}


def latency_figure(bundles: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One row per bundle: CDF of the paper scenario, percentile bars, p99.9 vs Poisson rate."""
    plt = _plt()
    rows = max(len(bundles), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.2 * rows), squeeze=False)
    for row, bundle in zip(axes, bundles, strict=False):
        ax_cdf, ax_bar, ax_rate = row
        modes = [m for m in bundle["modes"] if "paper" in m]
        for m in modes:
            q = m["paper"]["quantiles"]
            ax_cdf.plot(q["latency_ms"], q["fraction"], label=m["mode"],
                        color=MODE_COLORS.get(m["mode"]))
        ax_cdf.set_xscale("log")
        ax_cdf.set_xlabel("latency (ms, log)")
        ax_cdf.set_ylabel("fraction of queries")
        ax_cdf.set_title(f"k={bundle['k']}, n={bundle['n']}, {bundle.get('backend', 'thread')} "
                         f"workers: CDF, one straggler/group +{bundle['delay_ms']:.0f} ms")
        ax_cdf.grid(True, alpha=0.3)
        ax_cdf.legend(fontsize=8)

        stats_keys = ("p50_ms", "p99_ms", "p99.9_ms", "mean_ms")
        width = 0.8 / len(stats_keys)
        for j, key in enumerate(stats_keys):
            xs = [i + (j - 1.5) * width for i in range(len(modes))]
            ax_bar.bar(xs, [m["paper"]["stats"][key] for m in modes], width, label=key[:-3])
        ax_bar.set_xticks(range(len(modes)), [m["mode"] for m in modes], rotation=20, fontsize=8)
        ax_bar.set_ylabel("latency (ms)")
        ax_bar.set_title("paper setup: waves of k queries")
        ax_bar.legend(fontsize=8)
        ax_bar.grid(True, axis="y", alpha=0.3)

        for m in bundle["modes"]:
            pts = m.get("poisson") or []
            if pts:
                ax_rate.plot([p["rate_per_s"] for p in pts], [p["stats"]["p99.9_ms"] for p in pts],
                             "o-", label=m["mode"], color=MODE_COLORS.get(m["mode"]))
        ax_rate.set_xlabel("offered load (queries/s, Poisson)")
        ax_rate.set_ylabel("p99.9 latency (ms)")
        ax_rate.set_yscale("log")
        ax_rate.set_title("open loop")
        ax_rate.grid(True, alpha=0.3)
        if ax_rate.lines:
            ax_rate.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def load_latency_figure(record: dict[str, Any], path: Path, title: str) -> Path:
    """`python -m bench latency --load-fractions ...`: p99.9 against offered load, one panel
    per fault setting, one line per mode, the load generator's floor (echo server) dashed.
    A point whose load generator fell behind its schedule is drawn hollow."""
    plt = _plt()
    faults = list(record["fault_settings"])
    fig, axes = plt.subplots(1, max(len(faults), 1), figsize=(5.5 * max(len(faults), 1), 4.4),
                             squeeze=False, sharey=True)
    cap = record["capacity"][record["capacity"]["rates_from"]]["capacity_rps"]
    floor = [p for p in record["floor"] if "stats" in p]
    modes = list(dict.fromkeys(r["mode"] for r in record["table"]))
    for ax, fault in zip(axes[0], faults, strict=False):
        for mode in modes:
            pts = [r for r in record["table"] if r["mode"] == mode and r["fault"] == fault and "stats" in r]
            if not pts:
                continue
            color = MODE_COLORS.get(mode)
            xs, ys = [p["fraction"] for p in pts], [p["stats"]["p99.9_ms"] for p in pts]
            ax.plot(xs, ys, "-", color=color, label=mode)
            for x, y, p in zip(xs, ys, pts, strict=True):
                ax.plot([x], [y], "o", color=color, mfc=color if p["loadgen"]["keeps_up"] else "white")
        if floor:
            ax.plot([p["fraction"] for p in floor], [p["stats"]["p99.9_ms"] for p in floor], "--",
                    color="gray", label="floor: loadgen vs echo")
        ax.axvline(record["targets"]["fraction"], color="black", lw=0.6, ls=":")  # where the targets are read
        ax.set_yscale("log")
        ax.set_xlabel(f"offered load (fraction of uncoded capacity {cap:.0f} q/s)")
        ax.set_title(record["fault_settings"][fault]["label"], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("p99.9 latency (ms, log)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def overhead_figure(record: dict[str, Any], path: Path, title: str) -> Path:
    """Fig. 7-like bars (Enc, f, g at batch B), Fig. 8-like Enc vs k, decode time vs k."""
    plt = _plt()
    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(16, 4.2))
    comp = record["components"]
    names = list(comp)
    ax_a.bar(names, [comp[n]["median_ms"] for n in names], color="tab:blue")
    ax_a.set_ylabel(f"median ms per batch of {record['config']['batch_size']}")
    ax_a.set_title(f"compute time ({record['bundle_k_label']})")
    ax_a.grid(True, axis="y", alpha=0.3)

    enc = record["encoder_vs_k"]
    if enc:
        ks = [e["k"] for e in enc]
        ax_b.plot(ks, [e["median_ms"] for e in enc], "o-", label="Enc (per parity)")
        ax_b.axhline(comp["f"]["median_ms"], color="gray", ls="--", label="f")
        ax_b.set_yscale("log")
        ax_b.set_xlabel("k")
        ax_b.set_ylabel("median ms per batch (log)")
        ax_b.set_title(f"Enc time vs k ({enc[0]['source']})")
        ax_b.legend(fontsize=8)
        ax_b.grid(True, alpha=0.3)

    dec = record["decode_vs_k"]
    ks = [d["k"] for d in dec]
    ax_c.plot(ks, [d["one_shot_us"] for d in dec], "o-", label="one-shot CodingScheme.decode")
    ax_c.plot(ks, [d["online_us"] for d in dec], "s-", label="OnlineDecoder, all k adds + finalize")
    if dec and "online_last_arrival_us" in dec[0]:
        ax_c.plot(ks, [d["online_last_arrival_us"] for d in dec], "^-",
                  label="OnlineDecoder after k-th arrival (critical path)")
    ax_c.set_xlabel("k")
    ax_c.set_ylabel("median µs per coding group")
    ax_c.set_title("decode time per group (one erasure)")
    ax_c.legend(fontsize=8)
    ax_c.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def throughput_figure(record: dict[str, Any], path: Path, title: str) -> Path:
    """One panel per body: images/s of every mode and the PyTriton peer by request batch, with
    the coded compute ceiling and raw ONNX Runtime f at each batch as markers."""
    plt = _plt()
    cfg, peer_color = record["config"], "tab:green"
    series = [(mode, sec, MODE_COLORS.get(mode, "tab:gray")) for mode, sec in record["servers"].items()
              if "points" in sec]
    if "points" in record["peer"]:
        series.append(("triton-peer", record["peer"], peer_color))
    batches, bodies = cfg["batches"], cfg["bodies"]
    fig, axes = plt.subplots(1, len(bodies), figsize=(6.5 * len(bodies), 4.6), squeeze=False)
    width = 0.8 / max(1, len(series))
    for ax, body in zip(axes[0], bodies, strict=True):
        for j, (name, sec, color) in enumerate(series):
            rates = {p["batch"]: p["images_per_s"] for p in sec["points"]
                     if p["body"] == body and "images_per_s" in p}
            xs = [i - 0.4 + width * (j + 0.5) for i, b in enumerate(batches) if b in rates]
            ys = [rates[b] for b in batches if b in rates]
            ax.bar(xs, ys, width, color=color, label=name)
            for x, y in zip(xs, ys, strict=True):
                ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
        for i, b in enumerate(batches):
            c = record["ceilings"][str(b)]
            ax.hlines(c["coded"], i - 0.45, i + 0.45, colors="black", lw=1.5,
                      label="coded compute ceiling" if i == 0 else None)
            ax.hlines(c["raw_f"], i - 0.45, i + 0.45, colors="gray", linestyles="--", lw=1.2,
                      label="raw ONNX Runtime f" if i == 0 else None)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.set_ylabel("images/s")
        ax.set_title(f"{body} bodies", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    met = [t for t in record["targets"] if t["met"] is not None]
    summary = ", ".join(f"{t['name']} b={t['batch']}: {t['value']:.2f} {'met' if t['met'] else 'MISSED'}"
                        for t in met)
    fig.suptitle(f"{title}\n{summary}" if summary else title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def kernel_figure(record: dict[str, Any], path: Path) -> Path:
    """`python -m bench kernel`: us per decode and achieved bandwidth against vector size, per k."""
    import numpy as np

    plt = _plt()
    rows = record["rows"]
    ks = sorted({r["k"] for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, len(ks))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for color, k in zip(colors, ks, strict=True):
        mine = sorted((r for r in rows if r["k"] == k), key=lambda r: r["elements"])
        x = [r["elements"] for r in mine]
        left.plot(x, [r["fused_us"] for r in mine], "o-", color=color, label=f"fused k={k}")
        if any(r["unfused_us"] is not None for r in mine):
            left.plot(x, [r["unfused_us"] for r in mine], "x--", color=color, alpha=0.7, label=f"unfused k={k}")
        right.plot(x, [r["fused_gbps"] for r in mine], "o-", color=color, label=f"k={k}")
    copy_label = "host memory copy" if record["device"] == "cpu" else "device-to-device copy"
    right.axhline(record["copy_gbps"], color="black", lw=1, label=copy_label)
    right.axhline(0.85 * record["copy_gbps"], color="gray", lw=1, ls=":", label="85% of copy")
    for axis, ylabel in ((left, "us per decode (median)"), (right, "achieved GB/s (read + write)")):
        axis.set_xscale("log")
        axis.set_xlabel("elements per vector (d x batch)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
    left.set_yscale("log")
    fig.suptitle(f"one-shot decode, {record['backend']}: {record['device']}\n{record['machine_label']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def soak_figure(record: dict[str, Any], path: Path, title: str) -> Path:
    """`python -m bench soak`: per second, 200 responses/s, their p99, server RSS and open fds."""
    plt = _plt()
    per_s, samples = record["series"]["per_second"], record["series"]["samples"]
    sigterm_s = record["main_phase"]["wall_s"]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    t = [p["t_s"] for p in per_s]
    axes[0].plot(t, [p["ok_rps"] for p in per_s], lw=0.8, label="requests/s (200)")
    axes[0].plot(t, [p["queries_per_s"] for p in per_s], lw=0.8, label="queries/s (200)")
    axes[1].plot([p["t_s"] for p in per_s if p["p99_ms"] is not None],
                 [p["p99_ms"] for p in per_s if p["p99_ms"] is not None], lw=0.8, color="tab:red")
    axes[2].plot([s["t_s"] for s in samples], [s["rss_mib"] for s in samples], lw=0.8, color="tab:green")
    axes[3].plot([s["t_s"] for s in samples], [s["fds"] for s in samples], lw=0.8, color="tab:purple")
    flat = record["flatness"]
    labels = ("throughput", "p99 latency (ms)", f"server RSS (MiB), flat: {flat['rss_mib'].get('flat')}",
              f"server open fds, flat: {flat['fds'].get('flat')}")
    for ax, label in zip(axes, labels, strict=True):
        ax.axvline(sigterm_s, color="black", lw=0.8, ls="--")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[3].set_xlabel("time since the load started (s); dashed: SIGTERM")
    c, sig = record["counts"], record["sigterm"]
    fig.suptitle(f"{title}\nsent {c['sent']}, lost {c['lost']}, duplicated {c['duplicated']}, unflagged wrong "
                 f"{c['unflagged_wrong']}, malformed 5xx {c['malformed_5xx']}; SIGTERM exit "
                 f"{sig['exit_code']} in {sig['exit_s']} s — passed: {record['passed']}", fontsize=9)
    return _save(plt, fig, path)


def overload_figure(record: dict[str, Any], path: Path, title: str) -> Path:
    """`python -m bench overload`: goodput, p99 of admitted requests, 503s and RSS per step."""
    plt = _plt()
    steps = record["steps"]
    labels = [f"{s['step']}\n{s['connections']} conn" for s in steps]
    x = range(len(steps))
    cap = record["verdicts"]["capacity_rps"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = ((axes[0][0], [s["goodput_rps"] for s in steps], "goodput (200 responses/s)", "tab:blue"),
              (axes[0][1], [s["latency_ok_ms"].get("p99", 0.0) for s in steps], "p99 of 200s (ms)", "tab:red"),
              (axes[1][0], [s["rejected_503_per_s"] for s in steps], "503 responses/s", "tab:orange"),
              (axes[1][1], [s["rss_peak_mib"] or 0.0 for s in steps], "server RSS peak (MiB)", "tab:green"))
    for ax, values, ylabel, color in panels:
        ax.bar(x, values, color=color)
        ax.set_xticks(list(x), labels, fontsize=8)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].axhline(0.8 * cap, color="black", ls=":", lw=1, label="80 % of capacity")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path, dpi: int = 90) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
