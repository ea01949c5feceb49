"""`bench overhead`'s Enc-vs-k encoders: the `--encoder-*` flags pick and shape the architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import overhead
from bench.overhead import OverheadBenchError, OverheadConfig


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.devbundle import build_linear_bundle

    return build_linear_bundle(tmp_path_factory.mktemp("bundle") / "k2", k=2, shape=(1, 8, 8))


def test_encoder_flags_map_onto_the_config(bundle: Path) -> None:
    b = str(bundle)
    args = overhead.build_parser().parse_args(
        [b, "--encoder-arch", "squeezed", "--encoder-squeeze", "2", "--encoder-width", "16", "--encoder-blocks", "0",
         "--encoder-query-layers", "2"])
    assert overhead.config_from_args(args) == OverheadConfig(
        bundle=b, encoder_arch="squeezed", encoder_squeeze=2, encoder_width=16, encoder_blocks=0,
        encoder_query_layers=2)
    assert OverheadConfig(bundle=b).encoder_arch == "unet"  # the shipped `--preset cpu` U-Net by default
    for bad in (["--encoder-arch", "resnet"], ["--encoder-squeeze", "3"]):
        with pytest.raises(SystemExit):
            overhead.build_parser().parse_args([b, *bad])
    with pytest.raises(OverheadBenchError, match=r"--encoder-arch must be one of \['unet', 'squeezed'\]"):
        OverheadConfig(bundle=b, encoder_arch="resnet")


def test_torch_free_arch_lists_match_the_encoder_module() -> None:
    from trainer.models import encoder

    assert overhead.ENCODER_ARCHS == encoder.ENCODER_ARCHS
    assert overhead.SQUEEZE_FACTORS == encoder.SQUEEZE_FACTORS


def test_bad_encoder_shape_is_refused_before_timing(bundle: Path) -> None:
    cfg = OverheadConfig(bundle=str(bundle), encoder_arch="squeezed", encoder_squeeze=4)
    overhead.encoder_config(2, cfg, (1, 8, 8))  # 8 x 8 squeezes by 4
    with pytest.raises(OverheadBenchError, match="--encoder-\\* flags: .*divisible by squeeze = 4"):
        overhead.encoder_config(2, cfg, (1, 6, 6))
    assert overhead.main([str(bundle), "--encoder-arch", "unet", "--encoder-depth", "4"]) == 2  # 8 % 2**4


# torch.onnx's dynamo exporter warns about torch/onnxscript internals (export.onnx_export silences them too)
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_export_encoder_builds_the_chosen_architecture(bundle: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from runtime.manifest import ENCODER_IO

    cfg = OverheadConfig(bundle=str(bundle), encoder_arch="squeezed", encoder_squeeze=2, encoder_width=4,
                         encoder_blocks=1)
    info = overhead.export_encoder(3, cfg, (1, 8, 8), tmp_path / "enc.onnx")
    assert info["source"] == "SqueezedEncoder, random init, exported here"
    assert info["encoder_config"]["arch"] == "squeezed" and info["encoder_config"]["k"] == 3
    # lift 4*4+4, fuse (4+4)*4+4, 1 block 9*4*4+4, head 4*4+4, coefficient weights 4
    assert info["parameters"] == 20 + 36 + 148 + 20 + 4
    session = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {ENCODER_IO[0]: np.zeros((4, 3, 1, 8, 8), np.float32)})
    assert out.shape == (4, 1, 8, 8)
