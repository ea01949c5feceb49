"""trainer train-all: the plan matches what `bench accuracy` reads; resume and staleness rules."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import pipeline
from trainer.errors import PipelineError
from trainer.pipeline import DEFAULT_ENCODER_RECIPE, TrainAllConfig, is_current, plan, recorded_f_hash
from trainer.runs import encoder_path, parm_path


def _config(tmp_path: Path, **kw) -> TrainAllConfig:
    kw.setdefault("settings", ["3,2", "6,4"])
    return TrainAllConfig(datasets=["mnist"], runs_dir=str(tmp_path), **kw)


def test_plan_orders_steps_and_writes_where_accuracy_reads(tmp_path: Path) -> None:
    steps = plan(_config(tmp_path), "mnist")
    names = [s.name for s in steps]
    assert names == ["classifier", "ideal_k2", "encoder_k2", "parm_k2", "ideal_n6_k4", "encoder_n6_k4"]
    outputs = {s.name: s.output for s in steps}
    assert outputs["encoder_k2"] == encoder_path(tmp_path, "mnist", 3, 2)
    assert outputs["encoder_n6_k4"] == encoder_path(tmp_path, "mnist", 6, 4)
    assert outputs["parm_k2"] == parm_path(tmp_path, "mnist", 2)
    by_name = {s.name: s for s in steps}
    # the encoder trains on the ideal data planned just before it, against the planned classifier
    enc = by_name["encoder_n6_k4"].argv
    assert enc[enc.index("--ideal-data") + 1] == str(outputs["ideal_n6_k4"])
    assert enc[enc.index("--classifier") + 1] == str(outputs["classifier"])
    assert by_name["classifier"].argv[by_name["classifier"].argv.index("--out") + 1] == str(tmp_path / "mnist")


def test_bad_setting_is_refused_and_new_settings_get_the_default_recipe(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a setting is 'n,k'"):
        TrainAllConfig(settings=["7-5"])
    enc = {s.name: s for s in plan(_config(tmp_path, settings=["7,5"]), "mnist")}["encoder_n7_k5"].argv
    assert enc[-len(DEFAULT_ENCODER_RECIPE) - 2 : -2] == DEFAULT_ENCODER_RECIPE


def _write_outputs(tmp_path: Path, classifier_hash: str, other_hash: str) -> None:
    run = tmp_path / "mnist"
    run.mkdir(parents=True)
    torch.save({"f_hash": classifier_hash}, run / "classifier.pt")
    np.savez(run / "ideal_k2.npz", meta_json=np.array(json.dumps({"f_hash": classifier_hash})))
    torch.save({"f_hash": other_hash}, run / "encoder_k2.pt")  # stale: another f
    (run / "parm_k2.pt").write_bytes(b"not a checkpoint")  # unreadable


def test_current_outputs_skip_stale_and_unreadable_ones_rerun(tmp_path: Path) -> None:
    _write_outputs(tmp_path, "a" * 64, "b" * 64)
    steps = {s.name: s for s in plan(_config(tmp_path), "mnist")}
    assert recorded_f_hash(steps["ideal_k2"].output) == "a" * 64
    assert is_current(steps["classifier"], None)
    assert is_current(steps["ideal_k2"], "a" * 64)
    assert not is_current(steps["encoder_k2"], "a" * 64)
    assert not is_current(steps["parm_k2"], "a" * 64)
    assert not is_current(steps["ideal_n6_k4"], "a" * 64)  # missing


def test_dry_run_runs_nothing_and_reports_each_action(tmp_path: Path, monkeypatch, caplog) -> None:
    _write_outputs(tmp_path, "a" * 64, "b" * 64)
    caplog.set_level(logging.INFO, logger="trainer.pipeline")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("dry run started a process"))
    records = pipeline.run(_config(tmp_path, dry_run=True))
    actions = {r["step"]: r["action"] for r in records}
    assert actions == {"classifier": "skip (current)", "ideal_k2": "skip (current)", "encoder_k2": "would run",
                       "parm_k2": "would run", "ideal_n6_k4": "would run", "encoder_n6_k4": "would run"}
    assert "python -m trainer encoder" in caplog.text


def test_failed_step_stops_the_run_naming_its_log(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_run(command, **kw):
        calls.append(command)
        return subprocess.CompletedProcess(command, returncode=3)

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(PipelineError, match=r"classifier failed with exit code 3; see .*logs/classifier.log"):
        pipeline.run(_config(tmp_path))
    assert len(calls) == 1  # nothing downstream ran on a missing classifier


def test_force_reruns_current_outputs(tmp_path: Path, monkeypatch) -> None:
    _write_outputs(tmp_path, "a" * 64, "b" * 64)
    ran = []
    monkeypatch.setattr(subprocess, "run",
                        lambda command, **kw: ran.append(command[3]) or subprocess.CompletedProcess(command, 0))
    pipeline.run(_config(tmp_path, force=True))
    assert ran == ["classifier", "ideal-data", "encoder", "parm", "ideal-data", "encoder"]


@pytest.mark.parametrize(("dataset", "blocks", "hidden", "epochs", "alpha", "shift"), [
    ("mnist", (2, 8), (16, 64), 16, 0.15, 1),  # the shipped bundle's f: the cpu preset as trained, 99.15 %
    ("fashion-mnist", (2, 20), (16, 32), 12, 0.3, 0),  # the cpu preset as trained, 90.41 %
])
def test_each_datasets_f_is_pinned_whatever_the_cpu_preset_says(dataset: str, blocks: tuple[int, ...],
                                                                 hidden: tuple[int, ...], epochs: int,
                                                                 alpha: float, shift: int, tmp_path: Path) -> None:
    from trainer.train_classifier import build_parser, config_from_args, resolve

    step = plan(TrainAllConfig(datasets=[dataset], runs_dir=str(tmp_path), settings=["3,2"]), dataset)[0]
    args = build_parser().parse_args(list(step.argv[1:]))  # drop the "classifier" sub-command
    model_cfg, cfg = resolve(config_from_args(args))
    assert model_cfg.f.blocks_per_stage == blocks and model_cfg.f.hidden_channels == hidden
    assert (cfg.epochs, cfg.mixup_alpha, cfg.augment_shift, cfg.batch_size, cfg.lr) == (epochs, alpha, shift, 128, 2e-3)
    assert "--blocks-per-stage" in step.argv and "--epochs" in step.argv  # explicit, not the preset's


def test_the_bundles_encoder_step_trains_the_light_encoder_on_50k_ideal_groups(tmp_path: Path) -> None:
    steps = {s.name: s for s in plan(TrainAllConfig(datasets=["mnist"], runs_dir=str(tmp_path), settings=["5,4"]),
                                     "mnist")}
    ideal, enc = steps["ideal_k4"].argv, steps["encoder_k4"].argv
    assert ideal[ideal.index("--groups") + 1] == "50000"
    assert enc[enc.index("--arch") + 1] == "squeezed" and enc[enc.index("--gan-weight") + 1] == "0"
    other = {s.name: s for s in plan(TrainAllConfig(datasets=["mnist"], runs_dir=str(tmp_path), settings=["3,2"]),
                                     "mnist")}["ideal_k2"].argv
    assert "--groups" not in other  # the cpu preset's 6,000 groups elsewhere


def test_records_and_plan_lines_carry_the_typed_command(tmp_path: Path, monkeypatch, caplog) -> None:
    # the step runs with this interpreter, but what is recorded is what a user would type
    caplog.set_level(logging.INFO, logger="trainer.pipeline")
    ran = []
    monkeypatch.setattr(subprocess, "run",
                        lambda command, **kw: ran.append(command) or subprocess.CompletedProcess(command, 0))
    records = pipeline.run(_config(tmp_path, force=True))
    assert ran[0][0] == sys.executable and ran[0][1:4] == ["-m", "trainer", "classifier"]
    assert all(r["command"].startswith("python -m trainer ") for r in records)
    assert "[mnist] classifier: run\n    python -m trainer classifier --dataset mnist" in caplog.text
    assert sys.executable not in caplog.text


def test_bad_setting_exits_2(tmp_path: Path, caplog) -> None:
    assert pipeline.main(["--settings", "7-5", "--runs-dir", str(tmp_path)]) == 2
    assert "a setting is 'n,k'" in caplog.text


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_k10_and_two_erasures_train_the_unet_the_rest_the_light_encoder(dataset: str, tmp_path: Path) -> None:
    settings = ["3,2", "5,4", "11,10", "4,2", "6,4"]
    steps = {s.name: s for s in plan(TrainAllConfig(datasets=[dataset], runs_dir=str(tmp_path), settings=settings),
                                     dataset)}

    def last(argv: tuple[str, ...], flag: str) -> str | None:  # argparse keeps a repeated flag's last value
        values = [argv[i + 1] for i, a in enumerate(argv) if a == flag]
        return values[-1] if values else None

    designs = {}
    for tag in ("k2", "k4", "k10", "n4_k2", "n6_k4"):
        argv = steps[f"encoder_{tag}"].argv
        assert (last(argv, "--gan-weight"), last(argv, "--d-steps"), last(argv, "--steps")) == ("0", "0", "8000")
        designs[tag] = tuple(last(argv, f) for f in ("--arch", "--base-channels", "--depth", "--shared-levels"))
    light, unet = ("squeezed", None, None, None), (None, "16", "2", "2")  # no --arch: the U-Net
    assert designs == {"k2": light, "k4": light, "n4_k2": light, "k10": unet, "n6_k4": unet}
