"""`python -m bench.report`: bench/results/serving/serving.md from the latency, overhead and
throughput JSONs (bench/results/serving/ and bench/results/overhead/).

Tables are rendered from the recorded JSON only, so the markdown can never disagree with
the measurements; the PNGs next to each JSON are linked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _machine(rec: dict[str, Any]) -> str:
    m = rec["machine"]
    gpu = m["gpus"][0]["name"] if m.get("gpus") else "no GPU"
    load = m.get("load_average")
    return (f"{m['cpu_model']}, {m['cpu_count_usable']} usable cores, {gpu}; load average at start "
            f"{load[0] if load else '?'} (CPUs shared with other jobs); commit {m.get('git_commit')}, "
            f"{m['time_utc']}")


def latency_section(path: Path, png: str) -> list[str]:
    rec = json.loads(path.read_text())
    cfg = rec["config"]
    out = [f"### Latency: `{path.name}`", "", f"![latency]({png})", "",
           f"Machine: {_machine(rec)}.", "",
           f"Config: {cfg['num_queries']} queries/mode closed loop (k clients), straggler +{cfg['delay_ms']:g} ms "
           f"on one of the first k workers per group; Poisson rates {cfg['poisson_rates']} q/s x "
           f"{cfg['poisson_queries']} queries; max queue delay {cfg['max_queue_delay_ms']} ms; "
           f"wall {rec['wall_s']} s.", ""]
    for b in rec["bundles"]:
        out += [f"**{b['bundle']}** (n={b['n']}, k={b['k']}):", "",
                "| mode | p50 ms | p99 ms | p99.9 ms | mean ms | q/s | reconstructed | failed |",
                "|---|---|---|---|---|---|---|---|"]
        for m in b["modes"]:
            if "paper" not in m:
                out.append(f"| {m['mode']} | error: {m.get('error', '?')[:80]} |||||||")
                continue
            s = m["paper"]["stats"]
            out.append(f"| {m['mode']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['p99.9_ms']:.1f} | "
                       f"{s['mean_ms']:.1f} | {s['throughput_rps']:.1f} | {s['reconstructed_fraction']:.2f} | "
                       f"{s['failed']} |")
        for mode, why in b.get("skipped", {}).items():
            out.append(f"| {mode} | skipped: {why} |||||||")
        t = b["targets"]
        out += ["", f"Targets (paper setup): coded p99.9 / reference p99.9 = {t.get('coded_over_reference')} "
                f"(target <= 1.05: {'met' if t.get('coded_within_1.05x_reference') else 'MISSED'}); "
                f"coded / uncoded = {t.get('coded_over_uncoded')} (target <= 0.5: "
                f"{'met' if t.get('coded_within_0.5x_uncoded') else 'MISSED'}); coded / coded-clean = "
                f"{t.get('coded_over_coded_clean')}.", ""]
        rows = [(m["mode"], p) for m in b["modes"] for p in m.get("poisson", [])]
        if rows:
            out += ["| mode | Poisson q/s | p50 ms | p99 ms | p99.9 ms | achieved q/s |", "|---|---|---|---|---|---|"]
            out += [f"| {mode} | {p['rate_per_s']:g} | {p['stats']['p50_ms']:.1f} | {p['stats']['p99_ms']:.1f} | "
                    f"{p['stats']['p99.9_ms']:.1f} | {p['stats']['throughput_rps']:.1f} |" for mode, p in rows]
            out.append("")
    return out


def overhead_section(path: Path, png: str) -> list[str]:
    rec = json.loads(path.read_text())
    cfg = rec["config"]
    out = [f"### Overhead: `{path.name}`", "", f"![overhead]({png})", "",
           f"Machine: {_machine(rec)}. Bundle `{cfg['bundle']}`, ONNX Runtime CPU, "
           f"{rec['ort_intra_op_threads']} intra-op threads, batch {cfg['batch_size']}, median of {cfg['repeats']}.",
           "", "| model | median ms / batch | / f |", "|---|---|---|"]
    for name, c in rec["components"].items():
        out.append(f"| {name} | {c['median_ms']:.2f} | {rec['ratio_to_f'].get(name, 1.0):.4f} |")
    if rec["encoder_vs_k"]:
        design = rec["encoder_vs_k"][0].get("encoder_config", {}).get("arch", "unet")
        out += ["", f"| k | Enc median ms / batch ({design} encoder, random init) | / bundle f | / (k x f) |",
                "|---|---|---|---|"]
        out += [f"| {e['k']} | {e['median_ms']:.1f} | {e['ratio_to_bundle_f']:.3f} | "
                f"{e.get('ratio_to_bundle_f_per_query', float('nan')):.3f} |" for e in rec["encoder_vs_k"]]
    for ref in rec.get("reference_f", []):
        out += ["", f"Untrained f of the `{ref['preset']}` preset at the same batch: {ref['median_ms']:.1f} ms; "
                f"Enc / this f by k: {ref['enc_vs_k_over_this_f']}."]
    out += ["", "| k | one-shot decode µs / group | online, all adds + finalize µs | online after k-th arrival µs |",
            "|---|---|---|---|"]
    out += [f"| {d['k']} | {d['one_shot_us']:.1f} | {d['online_us']:.1f} | "
            f"{d.get('online_last_arrival_us', float('nan')):.1f} |" for d in rec["decode_vs_k"]]
    t = rec["targets"]
    out += ["", f"Targets: Enc/f = {t['enc_over_f']}, per query Enc/(k f) = {t.get('enc_over_f_per_query')} "
            f"(target Enc/f <= 0.03: "
            f"{'met' if t['enc_over_f_within_3pct'] else 'MISSED'}); Enc time max/min over k = "
            f"{t['enc_vs_k_max_over_min']} (target: flat).", ""]
    return out


def _throughput_section_v1(rec: dict[str, Any], path: Path, png: str) -> list[str]:
    """Records written before the wrk rewrite (one closed-loop Python client, batch 1)."""
    raw = rec["raw"]
    out = [f"### Throughput: `{path.name}` (old layout: Python load generator, batch 1)", "",
           f"![throughput]({png})", "",
           f"Machine: {_machine(rec)}. Bundle `{rec['config']['bundle']}`, n={rec['n']}, k={rec['k']}, "
           f"{rec['config']['concurrency']} closed-loop clients, no faults.", "",
           f"Raw ONNX Runtime f, batch 1: {raw['images_per_s']:.0f} images/s (best of one session x "
           f"{raw['cpus']} threads and {raw['cpus']} single-thread sessions; mean of "
           f"{raw.get('images_per_s_before', 0):.0f} before and {raw.get('images_per_s_after', 0):.0f} after the "
           f"servers ran); encoders, batch 1 (mean before/after): "
           f"{[round(v['best_per_s'], 1) for v in raw['encoder_batch1_groups'].values()]} groups/s.", "",
           "| mode | server q/s | p50 ms | ceiling raw x k/n | ratio | ceiling with encoders | ratio |",
           "|---|---|---|---|---|---|---|"]
    for mode, srv in rec["servers"].items():
        s, ideal, ratio = srv["stats"], srv["ideal_rps"], srv["ratio"]
        out.append(f"| {mode} | {s['throughput_rps']:.1f} | {s['p50_ms']:.1f} | {ideal['raw_x_k_over_n']:.1f} | "
                   f"{ratio['raw_x_k_over_n']:.3f} | {ideal['with_encoders']:.1f} | {ratio['with_encoders']:.3f} |")
    t = rec["targets"]
    out += ["", f"Target ({t['mode']}): server >= 0.9 x raw x k/n: ratio {t['ratio_vs_raw_x_k_over_n']} "
            f"({'met' if t['within_0.9'] else 'MISSED'}).", ""]
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _throughput_points(name: str, sec: dict[str, Any]) -> list[str]:
    """Table rows of one server (a mode or the peer): measured, failed or skipped."""
    if "skipped" in sec:
        return [f"| {name} | skipped: {sec['skipped'][:160]} |||||||||"]
    if "error" in sec:
        return [f"| {name} | error: {sec['error'][:160]} |||||||||"]
    rows = []
    for p in sec["points"]:
        if "error" in p:
            rows.append(f"| {name} | {p['batch']} | {p['body']} | error: {p['error'][:120]} |||||||")
            continue
        c = p["cpu"]
        per_dispatch = p.get("queries_per_dispatch")  # older records and unreadable endpoints: none
        rows.append(f"| {name} | {p['batch']} | {p['body']} | {p['images_per_s']:.0f} | {p['requests_per_s']:.1f} | "
                    f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {c['server_cores']:.2f} + {c['client_cores']:.2f} + "
                    f"{c.get('other_cores', 0.0):.2f} | {c['busiest_thread_cores']:.2f} | "
                    f"{'–' if per_dispatch is None else f'{per_dispatch:.1f}'} |")
    return rows


def throughput_section(path: Path, png: str) -> list[str]:
    rec = json.loads(path.read_text())
    if rec.get("layout") != 2:
        return _throughput_section_v1(rec, path, png)
    cfg, raw = rec["config"], rec["raw"]
    out = [f"### Throughput: `{path.name}`", "", f"![throughput]({png})", "",
           f"Machine: {_machine(rec)}. Bundle `{cfg['bundle']}`, n={rec['n']}, k={rec['k']}, no faults; "
           f"wrk, {cfg['connections']} connections, {cfg['wrk_threads']} thread, {cfg['duration_s']} s per point "
           f"after {cfg['warmup_s']} s warm-up; {rec['images']}; server flags: "
           f"`{' '.join(cfg['server_args']) or '(defaults)'}`; wall {rec['wall_s']:.0f} s.", "",
           f"Raw ONNX Runtime on {raw['cpus']} cores (best of one session x {raw['cpus']} threads and "
           f"{raw['cpus']} single-thread sessions; mean of before and after the servers):", "",
           "| model | batch | best /s | one session /s | session per CPU /s | before /s | after /s | "
           "other jobs' cores |", "|---|---|---|---|---|---|---|---|"]
    rows = [("f (images)", b, v) for b, v in raw["f"].items()]
    rows += [(f"Enc {r} (groups)", g, v) for r, e in raw["encoders"].items() for g, v in e.items()]
    out += [f"| {name} | {b} | {v['best_per_s']:.0f} | {v['one_session_per_s']:.0f} | "
            f"{v['session_per_cpu_per_s']:.0f} | {v['best_per_s_before']:.0f} | {v['best_per_s_after']:.0f} | "
            f"{v.get('other_cores', 0.0):.2f} |" for name, b, v in rows]
    out += ["", "Ceilings, images/s: coded = k / (n / f(b) + Σ_r 1 / Enc_r(G)), G = ceil(b / k) groups per request; "
            "the second with f at G, what each worker call runs when every request is its own dispatch "
            "(the points' queries / dispatch say what the batcher really merged).", "",
            "| batch | G | raw f | raw f x k/n | coded ceiling | coded ceiling, f at G |", "|---|---|---|---|---|---|"]
    out += [f"| {b} | {c['groups_per_request']} | {c['raw_f']:.0f} | {c['raw_f_x_k_over_n']:.0f} | {c['coded']:.0f} | "
            f"{c['coded_f_at_worker_batch']:.0f} |" for b, c in rec["ceilings"].items()]
    out += ["", "Cores busy during each point: the server's process tree, wrk, and other jobs on the machine; "
            "the busiest single thread of the server's tree beside them; queries per dispatch from the "
            "server's statistics endpoint (– where it was not recorded or not readable).", "",
            "| server | batch | body | images/s | requests/s | p50 ms | p99 ms | cores: server + wrk + other | "
            "busiest thread | queries / dispatch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, sec in rec["servers"].items():
        out += _throughput_points(mode, sec)
    out += _throughput_points("PyTriton peer (uncoded)", rec["peer"])
    out += ["", "| batch | body | coded / ceiling | coded / ceiling (f at G) | coded / (raw f x k/n) | "
            "uncoded / raw f | coded / peer |", "|---|---|---|---|---|---|---|"]
    out += [f"| {r['batch']} | {r['body']} | {_fmt(r['coded_vs_ceiling'])} | "
            f"{_fmt(r['coded_vs_ceiling_f_at_worker_batch'])} | {_fmt(r['coded_vs_raw_f_x_k_over_n'])} | "
            f"{_fmt(r['uncoded_vs_raw_f'])} | {_fmt(r['coded_vs_peer'])} |" for r in rec["ratios"]]
    out += ["", "Targets:", ""]
    for t in rec["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        limit = f" Limit: {t['limit']}." if t.get("limit") else ""
        out.append(f"- {t['name']}, batch {t['batch']}, {t['body']} bodies: {_fmt(t['value'], 3)} "
                   f"(target >= {t['threshold']}): **{state}**.{limit}")
    return [*out, ""]


# (folder under the results dir, record pattern, renderer), in the page's order
SECTIONS = (("serving", "latency*.json", latency_section), ("overhead", "overhead*.json", overhead_section),
            ("serving", "throughput*.json", throughput_section))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    p.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--out", type=Path, default=None, help="default RESULTS_DIR/serving/serving.md")
    args = p.parse_args(argv)
    d = args.results_dir
    out = args.out or d / "serving" / "serving.md"
    lines = ["# Serving benchmarks (generated by `python -m bench.report`)", "",
             "Every figure below comes from a JSON record in bench/results/serving/ or bench/results/overhead/ "
             "written by `python -m bench latency|overhead|throughput`; see each record's `config` and `machine`.", ""]
    notes = d / "serving" / "serving-notes.md"  # hand-written reading of the figures, if present
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    for folder, pattern, section in SECTIONS:
        for path in sorted((d / folder).glob(pattern)):
            png = Path(os.path.relpath(path.with_suffix(".png"), out.parent)).as_posix()
            lines += section(path, png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
