"""Soak bench: its requests and checks without a server, then a short soak of the real
server (tiny exact bundle, faults on) whose count verdicts must all hold.

No wall-clock thresholds: the exit-time and flatness targets are bench verdicts, recorded by
`python -m bench soak`, not asserted here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from runtime_harness import CHW, build_tiny_bundle  # noqa: E402

from bench.soak import SoakBenchError, SoakConfig, build_parser, run  # noqa: E402
from bench.soakload import (  # noqa: E402
    EXPECTED_STATUS,
    MALFORMED,
    Checker,
    Planned,
    Workload,
    decode_response,
    flatness,
    ort_reference,
    per_second,
)
from runtime.manifest import Manifest  # noqa: E402
from runtime.protocol import encode_response  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - runtime_harness.TinyModel
    return build_tiny_bundle(tmp_path_factory.mktemp("soak") / "tiny", k=2, n=3)


def _images(num: int = 64) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (num, *CHW), dtype=np.uint8)


def test_ort_reference_matches_the_numpy_model(tiny) -> None:  # noqa: ANN001
    images = _images()
    ref = ort_reference(tiny.bundle, Manifest.load(tiny.bundle), images, batch=10)
    for task, logits in tiny.logits(images).items():
        np.testing.assert_allclose(ref[task], logits, rtol=1e-4, atol=1e-4)  # float32 ONNX vs float64


def test_workload_is_seeded_and_covers_every_malformed_kind(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = SoakConfig(bundle=str(tiny.bundle), malformed_fraction=0.5, out_dir=str(tmp_path))
    m = Manifest.load(tiny.bundle)
    w = Workload(cfg, m, _images(), max_batch_size=64)
    a, b = [w.plan(i) for i in range(200)], [w.plan(i) for i in range(200)]
    assert [p.body for p in a] == [p.body for p in b]
    kinds = {p.kind for p in a}
    assert "ok" in kinds and len(kinds) > 10
    assert len({p.rid for p in a if p.kind == "ok"}) == sum(p.kind == "ok" for p in a)
    for kind, build in MALFORMED.items():
        body, headers = build(w)
        assert isinstance(body, bytes) and "Content-Type" in headers, kind
    assert set(EXPECTED_STATUS) <= set(MALFORMED)
    assert len(MALFORMED["too_large"](w)[0]) == cfg.max_body_bytes + 1


def test_checker_flags_wrong_ids_duplicates_and_unflagged_wrong_classes(tiny) -> None:  # noqa: ANN001
    m = Manifest.load(tiny.bundle)
    images = _images()
    ref = tiny.logits(images)
    checker = Checker(m, ref, labels=None)
    idx = np.array([3, 5])

    def response(rid: str, logits: dict[str, np.ndarray], flags: list[bool], binary: bool = False):  # noqa: ANN202
        tensors = {}
        for t, v in logits.items():
            tensors[f"{t}_logits"] = v.astype(np.float32)
            tensors[f"{t}_class"] = np.argmax(v, axis=1).astype(np.int64)
        tensors["reconstructed"] = np.array(flags)
        return encode_response("tiny", rid, tensors, None, binary, {"reconstructed": any(flags)})

    def planned(rid: str) -> Planned:
        return Planned("ok", b"", {}, "tiny", rid, idx)

    good = {t: v[idx] for t, v in ref.items()}
    assert checker.check(planned("r1"), *response("r1", good, [False, True])) == "ok"
    assert checker.check(planned("r1"), *response("r1", good, [False, False])) == "duplicate"
    assert checker.check(planned("r2"), *response("r9", good, [False, False])) == "id_mismatch"
    body, headers = response("r3", good, [True, False], binary=True)
    assert decode_response(body, headers)[1]["reconstructed"].tolist() == [True, False]
    assert checker.check(planned("r3"), body, headers) == "ok"
    wrong = {t: v[idx][:, ::-1] for t, v in ref.items()}  # classes reversed: wrong unless a tie
    assert checker.check(planned("r4"), *response("r4", wrong, [True, True])) == "ok"
    assert checker.c["unflagged_wrong"] == 0  # flagged answers are reported, not failures
    checker.check(planned("r5"), *response("r5", wrong, [False, False]))
    assert checker.c["unflagged_wrong"] > 0 and checker.wrong_examples
    assert checker.check(planned("r6"), b"{not json", {}) == "bad_response"


def test_flatness_and_per_second() -> None:
    assert flatness([100.0] * 4)["flat"] is None
    assert flatness([100.0] * 8 + [105.0] * 8, rel=0.10)["flat"] is True
    assert flatness([100.0] * 8 + [120.0] * 8, rel=0.10)["flat"] is False
    assert flatness([20] * 8 + [26] * 8, add=5)["flat"] is False
    rows = [(0.5, 0.01, 200, 2), (0.7, 0.02, 503, 1), (1.2, 0.03, 200, 4), (2.9, 0.04, 200, 1)]
    series = per_second(rows, 3.0)
    assert [s["ok_rps"] for s in series] == [1, 1, 1]
    assert [s["queries_per_s"] for s in series] == [2, 4, 1]
    assert series[1]["p99_ms"] == pytest.approx(30.0)


def test_config_errors(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(SoakBenchError, match="not a bundle"):
        SoakConfig(bundle=str(tmp_path))
    with pytest.raises(SoakBenchError, match=r"--fail-prob must be in \[0, 1\], got 1.5"):
        SoakConfig(bundle=str(tiny.bundle), fail_prob=1.5)
    with pytest.raises(SoakBenchError, match="--clients must be >= 1"):
        SoakConfig(bundle=str(tiny.bundle), clients=0)
    args = build_parser().parse_args([str(tiny.bundle), "--requests", "7", "--kill-prob", "0.1"])
    assert (args.requests, args.kill_prob, args.bundle) == (7, 0.1, str(tiny.bundle))


def test_short_soak_under_faults_loses_nothing(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    images = _images(200)
    cfg = SoakConfig(bundle=str(tiny.bundle), requests=1500, duration_s=8.0, clients=8, fail_prob=0.05,
                     kill_prob=0.005, delay_prob=0.05, delay_ms=20.0, malformed_fraction=0.15,
                     drain_timeout_s=2.0, out_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "run"), tag="t")
    record = run(cfg, images=images, labels=None, reference=tiny.logits(images))
    v, c = record["verdicts"], record["counts"]
    for name in ("lost_0", "duplicated_0", "unflagged_wrong_0", "bad_responses_0", "well_formed_500_0",
                 "malformed_5xx_0", "malformed_all_4xx_json", "sigterm_inflight_all_answered"):
        assert v[name] is True, (name, c, record["failure_examples"])
    # After SIGTERM: a clean 503 or refused. A connection the kernel had queued but the server had
    # not accepted when it closed its listener is reset (a known server race, see
    # bench/results/README.md); the bench records it as a failed verdict, the test lets it pass.
    assert c["after_sigterm_unclean"] == c["after_sigterm_reset"], record["sigterm"]
    assert record["sigterm"]["exit_code"] == 0
    assert c["sent_main"] > 0 and c["sent"] >= c["sent_main"]
    answers = record["answers"]
    assert answers["plain"] > 0 and answers["reconstructed"] > 0  # faults forced reconstructions
    assert answers["reconstructed_agreement_with_reference"] == 1.0  # the tiny bundle decodes exactly
    for kind, statuses in record["malformed_by_kind"].items():
        numeric = {int(s) for s in statuses if s.isdigit()}
        assert numeric <= {EXPECTED_STATUS.get(kind, 400), 503}, (kind, statuses)
    saved = json.loads((tmp_path / "out" / "soak-t.json").read_text())
    assert saved["counts"] == c and (tmp_path / "out" / "soak-t.png").is_file()
    assert saved["series"]["samples"] and saved["series"]["per_second"]
