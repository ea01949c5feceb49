"""The exporter refuses checkpoints that do not belong together, before exporting anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_fixtures import save_classifier, save_encoders, save_parm, tiny_classifier

from export.errors import CheckpointMismatchError, ExportError
from export.sources import load_sources
from trainer.models import fingerprint


def test_consistent_checkpoints_load(checkpoints: dict[str, Path]) -> None:
    sources = load_sources([str(p) for p in checkpoints.values()])
    assert sources.coding.k == 2 and sources.coding.n == 3
    assert sources.f_hash == fingerprint(sources.classifier.f)
    assert len(sources.encoders.encoders) == 1 and sources.parm is not None
    assert sources.dataset == "mnist"


def test_order_of_checkpoints_does_not_matter(checkpoints: dict[str, Path]) -> None:
    sources = load_sources([str(checkpoints["parm"]), str(checkpoints["encoder"]), str(checkpoints["classifier"])])
    assert sources.parm is not None and sources.encoders is not None


def test_encoder_trained_against_another_f_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    other_hash = fingerprint(tiny_classifier(seed=5).f)
    enc = save_encoders(tmp_path / "enc_other.pt", other_hash)
    with pytest.raises(CheckpointMismatchError, match="trained against f_hash"):
        load_sources([str(checkpoints["classifier"]), str(enc)])


def test_parm_trained_against_another_f_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    other = tiny_classifier(seed=6)
    parm = save_parm(tmp_path / "parm_other.pt", other, fingerprint(other.f))
    with pytest.raises(CheckpointMismatchError, match="trained against f_hash"):
        load_sources([str(checkpoints["classifier"]), str(parm)])


def _f_hash(checkpoints: dict[str, Path]) -> str:
    return torch.load(checkpoints["classifier"], weights_only=True)["f_hash"]


def test_parm_of_another_k_gets_its_own_average_code(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_classifier()
    parm3 = save_parm(tmp_path / "parm_k3.pt", model, fingerprint(model.f), k=3)
    sources = load_sources([str(checkpoints["classifier"]), str(parm3), str(checkpoints["encoder"])])
    assert [(c.coding.n, c.coding.k) for c in sources.codes] == [(3, 2), (4, 3)]  # encoders' codes first
    first, second = sources.codes
    assert first.encoders is not None and first.parm is None
    assert second.encoders is None and second.parm is not None and second.parm_path == parm3
    assert second.coding.coefficients.tolist() == [[1 / 3, 1 / 3, 1 / 3]]
    assert sources.ks == [2, 3] and sources.coding is first.coding  # the default code's parts


def test_several_codes_and_where_each_parm_goes(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    f_hash = _f_hash(checkpoints)
    enc42 = save_encoders(tmp_path / "enc_4_2.pt", f_hash, coefficients=[[0.5, 0.5], [1.0, 2.0]])
    enc43 = save_encoders(tmp_path / "enc_4_3.pt", f_hash, k=3)
    parm3 = save_parm(tmp_path / "parm_k3.pt", tiny_classifier(), f_hash, k=3)
    sources = load_sources([str(checkpoints["classifier"]), str(enc42), str(checkpoints["parm"]), str(enc43),
                            str(checkpoints["encoder"]), str(parm3)])
    assert [(c.coding.n, c.coding.k) for c in sources.codes] == [(4, 2), (4, 3), (3, 2)]
    by_code = {(c.coding.n, c.coding.k): c for c in sources.codes}
    assert by_code[(3, 2)].parm_path == checkpoints["parm"]  # k = 2: the n = k + 1 code, not the first
    assert by_code[(4, 2)].parm is None and len(by_code[(4, 2)].encoders.encoders) == 2
    assert by_code[(4, 3)].parm_path == parm3  # the only code with k = 3
    assert all(c.encoders is not None for c in sources.codes)


def test_two_encoders_of_one_code_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    again = save_encoders(tmp_path / "enc_again.pt", _f_hash(checkpoints))
    with pytest.raises(ExportError, match=rf"encoders '{checkpoints['encoder']}' and '{again}' are both for the "
                                          r"code n=3, k=2"):
        load_sources([str(checkpoints["classifier"]), str(checkpoints["encoder"]), str(again)])


def test_two_parms_of_one_k_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    again = save_parm(tmp_path / "parm_again.pt", tiny_classifier(), _f_hash(checkpoints))
    with pytest.raises(ExportError, match=rf"ParM checkpoints '{checkpoints['parm']}' and '{again}' both have k=2"):
        load_sources([str(checkpoints["classifier"]), str(checkpoints["parm"]), str(again)])


def test_k_flag_must_match_the_encoders(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"--k has k=4"):
        load_sources([str(checkpoints["classifier"]), str(checkpoints["encoder"])], k=4)
    model = tiny_classifier()
    parm3 = save_parm(tmp_path / "parm_k3.pt", model, fingerprint(model.f), k=3)
    with pytest.raises(CheckpointMismatchError, match=r"k mismatch: --k has k=2, .*k=2, .*k=3; with --k"):
        load_sources([str(checkpoints["classifier"]), str(checkpoints["encoder"]), str(parm3)], k=2)


def test_classifier_alone_needs_k(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ExportError, match="pass --k K"):
        load_sources([str(checkpoints["classifier"])])
    sources = load_sources([str(checkpoints["classifier"])], k=3)
    assert (sources.coding.n, sources.coding.k) == (4, 3)
    assert sources.coding.coefficients.tolist() == [[1 / 3, 1 / 3, 1 / 3]]


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        load_sources([str(tmp_path / "nope.pt")])


def test_corrupt_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(checkpoints["classifier"].read_bytes()[:200])
    with pytest.raises(ExportError, match="corrupt, truncated"):
        load_sources([str(bad)])


def test_wrong_schema_version(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data = torch.load(checkpoints["classifier"], weights_only=True)
    data["schema_version"] = 99
    path = tmp_path / "v99.pt"
    torch.save(data, path)
    with pytest.raises(ExportError, match="schema_version 99"):
        load_sources([str(path)], k=2)


def test_unknown_schema(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"schema": "someone/else", "state_dict": {}}, path)
    with pytest.raises(ExportError, match="has schema 'someone/else'"):
        load_sources([str(path)], k=2)


def test_classifier_weights_edited_after_training(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data = torch.load(checkpoints["classifier"], weights_only=True)
    key = next(k for k in data["state_dict"] if k.startswith("f.") and k.endswith("weight"))
    data["state_dict"][key] = data["state_dict"][key] * 0.5
    path = tmp_path / "edited.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointMismatchError, match="f_hash"):
        load_sources([str(path)], k=2)


def test_two_classifiers_are_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    second = save_classifier(tmp_path / "second.pt", tiny_classifier(seed=3))
    with pytest.raises(ExportError, match="exactly one classifier"):
        load_sources([str(checkpoints["classifier"]), str(second)], k=2)


def test_encoder_coding_must_match_its_coefficients(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    data = torch.load(checkpoints["encoder"], weights_only=True)
    data["coding"] = {"n": 3, "k": 2, "coefficients": [[0.25, 0.75]]}
    path = tmp_path / "enc_bad_coding.pt"
    torch.save(data, path)
    with pytest.raises(CheckpointMismatchError, match="disagrees with the coefficients"):
        load_sources([str(checkpoints["classifier"]), str(path)])
