"""bench accuracy: ApproxIFER's exact properties, table writing, and not-run reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bench.accuracy import NOT_RUN, AccuracyBenchError, AccuracyConfig, evaluate_approxifer, parse_setting, run
from kernels.berrut import BerrutCode


def _affine_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(1 * 6 * 6, 4)).eval()


@pytest.mark.parametrize(("n", "k"), [(3, 2), (5, 4), (11, 10), (6, 4)])
def test_approxifer_decode_commutes_with_affine_model(n: int, k: int) -> None:
    # Exact property: the encoding rows sum to 1, so an affine model h commutes with it:
    # decode(h(encode(x))) == decode(encode(h(x))), i.e. ApproxIFER on an affine model is
    # exactly Berrut interpolation of the true outputs (not the outputs themselves).
    model = _affine_model()
    code = BerrutCode(n, k)
    x = np.random.default_rng(0).normal(size=(k, 1, 6, 6)).astype(np.float32)
    with torch.no_grad():
        h = lambda v: model(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))).numpy()  # noqa: E731
        survivors = list(range(1, n))  # worker 0 erased
        coded_then_model = code.decode(survivors, h(code.encode(x))[survivors])
        model_then_coded = code.decode(survivors, code.encode(h(x))[survivors])
    np.testing.assert_allclose(coded_then_model, model_then_coded, rtol=0, atol=1e-4)


def test_approxifer_reproduces_constants() -> None:
    # Identical queries: the interpolant is constant, so every decoded output equals h(x)
    # exactly, for any model, and the evaluation agrees with the base model everywhere.
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    images = torch.randn(5, 1, 6, 6)
    groups = np.repeat(np.arange(5)[:, None], 4, axis=1)  # (5, 4): each group one image 4 times
    labels = model(images).argmax(1).detach()
    res = evaluate_approxifer(model, images, labels, groups, n=6, batch_size=2)
    assert res["acc_base"] == 1.0 and res["acc_labels"] == 1.0 and res["normal_acc_labels"] == 1.0
    assert res["patterns"] == 15  # C(6, 2)


def test_not_run_when_checkpoints_missing(tmp_path) -> None:
    config = AccuracyConfig(datasets=["mnist"], settings=["5,4", "6,4"], runs_dir=str(tmp_path / "runs"),
                            out_dir=str(tmp_path / "out"))
    record = run(config, ["test"])
    assert {r["status"] for r in record["rows"]} == {NOT_RUN}
    assert len(record["rows"]) == 6
    saved = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert saved["rows"] == record["rows"]
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| mnist | (5,4) | ParM |" in md and NOT_RUN in md
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0


def test_setting_errors() -> None:
    assert parse_setting("11,10") == (11, 10)
    with pytest.raises(AccuracyBenchError, match="'n,k' like '5,4'"):
        parse_setting("5-4")
    with pytest.raises(AccuracyBenchError, match="n > k >= 2"):
        AccuracyConfig(settings=["4,4"])
