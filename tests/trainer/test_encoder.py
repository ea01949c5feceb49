"""Parity encoders (U-Net and squeezed): order invariance, output shapes, config validation and
round trip, ONNX export of the squeezed encoder, discriminator shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.errors import EncoderConfigError
from trainer.models.encoder import (
    DiscriminatorConfig,
    EncoderConfig,
    ParityEncoders,
    PixelDiscriminator,
    SqueezedEncoder,
    UNetEncoder,
    build_encoders,
    make_encoder,
)


def _config(k: int, rows: int = 1, **kw) -> EncoderConfig:
    coeffs = np.random.default_rng(k).uniform(0.1, 1.0, size=(rows, k)).tolist()
    return EncoderConfig(in_channels=1, image_size=[28, 28], k=k, coefficients=coeffs, base_channels=8, **kw)


@pytest.mark.parametrize("k", [2, 4, 10])
def test_output_shape(k: int) -> None:
    torch.manual_seed(0)
    enc = ParityEncoders(_config(k, rows=2)).eval()
    out = enc(torch.randn(3, k, 1, 28, 28))
    assert out.shape == (3, 2, 1, 28, 28)
    assert enc.encoders[1](torch.randn(5, k, 1, 28, 28)).shape == (5, 1, 28, 28)


def _order_check(config: EncoderConfig, randomise_head: bool = False) -> tuple[torch.Tensor, ...]:
    """(output, output for (query, coefficient) pairs permuted together, output for the
    queries alone permuted) of encoder row 0 of `config`, k = 4, unequal coefficients."""
    torch.manual_seed(0)
    enc = ParityEncoders(config).eval()
    if randomise_head:
        _randomise_head(enc)
    x = torch.randn(2, config.k, 1, 28, 28)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = ParityEncoders(
        EncoderConfig.from_dict({**config.to_dict(), "coefficients": [[config.coefficients[0][i] for i in perm]]})
    ).eval()
    permuted.load_state_dict({**enc.state_dict(), "encoders.0.coefficients": enc.encoders[0].coefficients[perm]})
    with torch.no_grad():
        return enc(x), permuted(x[:, perm]), enc(x[:, perm])


@pytest.mark.parametrize("shared_levels", [1, 2, 3])
def test_permutation_invariant(shared_levels: int) -> None:
    # unequal coefficients: permuting (query, coefficient) pairs together must not change the output
    y, y_pairs, _ = _order_check(_config(4, rows=1, shared_levels=shared_levels))
    np.testing.assert_allclose(y_pairs.numpy(), y.numpy(), rtol=0, atol=1e-5)


def test_uniform_code_is_order_invariant_and_depends_on_inputs() -> None:
    torch.manual_seed(1)
    config = EncoderConfig(in_channels=1, image_size=[28, 28], k=3, coefficients=[[1 / 3] * 3], base_channels=8)
    enc = ParityEncoders(config).eval()
    x = torch.randn(2, 3, 1, 28, 28)
    with torch.no_grad():
        y = enc(x)
        np.testing.assert_allclose(enc(x[:, [1, 2, 0]]).numpy(), y.numpy(), rtol=0, atol=1e-5)
        assert (enc(x.flip(0)) - y).abs().max() > 1e-3  # not a constant map


def test_config_errors() -> None:
    with pytest.raises(EncoderConfigError, match="expected k=3"):
        EncoderConfig(in_channels=1, image_size=[28, 28], k=3, coefficients=[[0.5, 0.5]])
    with pytest.raises(EncoderConfigError, match="divisible by 2\\*\\*depth"):
        EncoderConfig(in_channels=1, image_size=[28, 28], k=2, coefficients=[[0.5, 0.5]], depth=3)
    with pytest.raises(EncoderConfigError, match=r"EncoderConfig: unknown key\(s\) \['widht'\]"):
        build_encoders({**_config(2).to_dict(), "widht": 3})
    enc = ParityEncoders(_config(2))
    with pytest.raises(ValueError, match="encoder input must be"):
        enc(torch.randn(1, 3, 1, 28, 28))


def test_rebuild_from_config_roundtrip() -> None:
    config = _config(4, rows=2)
    enc = ParityEncoders(config).eval()
    again = build_encoders(config.to_dict())
    again.load_state_dict(enc.state_dict())
    x = torch.randn(2, 4, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(again.eval()(x).numpy(), enc(x).numpy(), rtol=0, atol=0)


def test_pixel_discriminator_is_per_pixel() -> None:
    torch.manual_seed(0)
    disc = PixelDiscriminator(DiscriminatorConfig(in_channels=1)).eval()
    cond, img = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        score = disc(cond, img)
        img2 = img.clone()
        img2[:, :, 5, 7] += 1.0  # a 1x1 discriminator's score changes only at that pixel
        diff = (disc(cond, img2) - score).abs()[:, 0]
    assert score.shape == (2, 1, 28, 28)
    assert diff[:, 5, 7].min() > 0
    diff[:, 5, 7] = 0
    assert diff.max() == 0


def test_cosine_lr_factor_runs_from_one_to_final() -> None:
    from trainer.train_encoder import cosine_factor

    factors = [cosine_factor(s, 100, 0.1) for s in range(0, 101)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))  # never rises
    assert cosine_factor(50, 100, 1.0) == 1.0  # factor 1 keeps the rate constant


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.5])
def test_lr_final_factor_out_of_range_is_refused(factor: float) -> None:
    from trainer.errors import EncoderTrainError
    from trainer.train_encoder import EncoderTrainConfig

    with pytest.raises(EncoderTrainError, match="lr_final_factor"):
        EncoderTrainConfig(classifier="c.pt", ideal_data="d.npz", out="o.pt", lr_final_factor=factor)


# --- the squeezed encoder -------------------------------------------------------------------


def _squeezed(k: int, rows: int = 1, **kw) -> EncoderConfig:
    return _config(k, rows, arch="squeezed", **kw)


@pytest.mark.parametrize("squeeze", [2, 4])
@pytest.mark.parametrize("k", [2, 4, 10])
def test_squeezed_output_shape(k: int, squeeze: int) -> None:
    torch.manual_seed(0)
    enc = ParityEncoders(_squeezed(k, rows=2, squeeze=squeeze, width=8, blocks=1)).eval()
    assert all(isinstance(e, SqueezedEncoder) for e in enc.encoders)
    with torch.no_grad():
        assert enc(torch.randn(3, k, 1, 28, 28)).shape == (3, 2, 1, 28, 28)
        assert enc.encoders[1](torch.randn(5, k, 1, 28, 28)).shape == (5, 1, 28, 28)


def _randomise_head(enc: ParityEncoders) -> None:
    """The head is zero-initialised (output = linear mix): give it weights so the rest shows."""
    for e in enc.encoders:
        torch.nn.init.normal_(e.head.weight, std=0.3)
        torch.nn.init.normal_(e.head.bias, std=0.3)


@pytest.mark.parametrize("query_layers", [1, 2])
def test_squeezed_permutation_invariant(query_layers: int) -> None:
    y, y_pairs, y_queries = _order_check(_squeezed(4, rows=1, width=8, query_layers=query_layers), randomise_head=True)
    np.testing.assert_allclose(y_pairs.numpy(), y.numpy(), rtol=0, atol=1e-5)
    # the (query, coefficient) pairing matters: permuting the queries alone changes the output
    assert (y_queries - y).abs().max() > 1e-3


@pytest.mark.parametrize("squeeze", [2, 4])
def test_untrained_squeezed_encoder_is_the_linear_mix(squeeze: int) -> None:
    torch.manual_seed(0)
    config = _squeezed(3, rows=2, squeeze=squeeze, width=8, query_layers=2)
    enc = ParityEncoders(config).eval()
    x = torch.randn(4, 3, 1, 28, 28)
    mix = torch.einsum("rk,bkchw->brchw", torch.tensor(config.coefficients), x)
    with torch.no_grad():
        out = enc(x)
        # bit-exact: the zero head adds exact zeros to the encoder's own sum_j c_j x_j
        np.testing.assert_array_equal(out.numpy(), torch.stack([e.linear_mix(x) for e in enc.encoders], 1).numpy())
    np.testing.assert_allclose(out.numpy(), mix.numpy(), rtol=0, atol=1e-6)


def _literal_squeezed(enc: SqueezedEncoder, x: torch.Tensor) -> torch.Tensor:
    """The squeezed encoder as specified: pixel_unshuffle, a constant coefficient channel, 1x1 lift."""
    B, k, C, H, W = x.shape
    s, d = enc.squeeze, enc.lift.out_channels
    coeff = enc.coefficients
    q = torch.nn.functional.pixel_unshuffle(x.reshape(B * k, C, H, W), s)  # (B*k, C*s*s, h, w)
    cj = coeff.view(1, k, 1, 1, 1).expand(B, k, 1, H // s, W // s).reshape(B * k, 1, H // s, W // s)
    weight = torch.cat([enc.lift.weight.reshape(d, -1), enc.lift_coeff.view(d, 1)], dim=1)  # (d, C*s*s + 1)
    feat = enc.per_query(enc.act(torch.nn.functional.conv2d(torch.cat([q, cj], 1), weight[..., None, None],
                                                            enc.lift.bias)))
    feat = feat.reshape(B, k, *feat.shape[1:]).mean(1)
    mix = torch.einsum("bkchw,k->bchw", x, coeff)
    feat = enc.fuse(torch.cat([feat, torch.nn.functional.pixel_unshuffle(mix, s)], 1))
    for conv in enc.blocks:
        feat = feat + enc.act(conv(feat))
    return torch.nn.functional.pixel_shuffle(enc.head(feat), s) + mix


@pytest.mark.parametrize(("squeeze", "channels", "query_layers"), [(4, 1, 1), (2, 3, 2)])
def test_squeezed_grouped_lift_is_pixel_unshuffle_plus_coefficient_channel(
    squeeze: int, channels: int, query_layers: int
) -> None:
    torch.manual_seed(0)
    k = 3
    config = EncoderConfig(in_channels=channels, image_size=[8, 12], k=k, coefficients=[[0.2, -0.7, 1.3]],
                           arch="squeezed", squeeze=squeeze, width=8, blocks=2, query_layers=query_layers)
    enc = ParityEncoders(config).eval()
    _randomise_head(enc)
    x = torch.randn(2, k, channels, 8, 12)
    with torch.no_grad():
        np.testing.assert_allclose(enc.encoders[0](x).numpy(), _literal_squeezed(enc.encoders[0], x).numpy(),
                                   rtol=0, atol=1e-5)


def test_squeezed_config_roundtrip_and_old_checkpoints_load_as_unet() -> None:
    config = _squeezed(4, rows=2, squeeze=2, width=12, blocks=2, query_layers=2)
    data = config.to_dict()
    assert {key: data[key] for key in ("arch", "squeeze", "width", "blocks", "query_layers")} == {
        "arch": "squeezed", "squeeze": 2, "width": 12, "blocks": 2, "query_layers": 2}
    assert EncoderConfig.from_dict(data) == config
    enc = ParityEncoders(config).eval()
    _randomise_head(enc)
    again = build_encoders(data)
    again.load_state_dict(enc.state_dict())
    x = torch.randn(2, 4, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(again.eval()(x).numpy(), enc(x).numpy(), rtol=0, atol=0)
    # a checkpoint written before `arch` existed: no squeezed keys at all
    old = {key: value for key, value in _config(4).to_dict().items()
           if key not in ("arch", "squeeze", "width", "blocks", "query_layers")}
    rebuilt = build_encoders(old)
    assert rebuilt.config.arch == "unet" and isinstance(rebuilt.encoders[0], UNetEncoder)


def test_squeezed_config_errors() -> None:
    with pytest.raises(EncoderConfigError, match=r"arch must be one of \['unet', 'squeezed'\], got 'resnet'"):
        _config(2, arch="resnet")
    with pytest.raises(EncoderConfigError, match="divisible by squeeze = 4"):
        EncoderConfig(in_channels=1, image_size=[30, 30], k=2, coefficients=[[0.5, 0.5]], arch="squeezed")
    with pytest.raises(EncoderConfigError, match=r"squeeze must be one of \[2, 4\]"):
        _squeezed(2, squeeze=3)
    with pytest.raises(EncoderConfigError, match="blocks must be >= 0"):
        _squeezed(2, blocks=-1)
    with pytest.raises(EncoderConfigError, match="width and query_layers must be >= 1"):
        _squeezed(2, query_layers=0)
    # the U-Net's depth check does not apply to the squeezed encoder (and vice versa)
    EncoderConfig(in_channels=1, image_size=[30, 30], k=2, coefficients=[[0.5, 0.5]], arch="squeezed", squeeze=2,
                  depth=3)
    EncoderConfig(in_channels=1, image_size=[28, 28], k=2, coefficients=[[0.5, 0.5]], squeeze=3)


def test_squeezed_encoder_is_lighter_and_nearly_flat_in_k() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    def macs(k: int, **kw) -> float:
        enc = make_encoder(EncoderConfig(in_channels=1, image_size=[28, 28], k=k, coefficients=[[1 / k] * k],
                                         base_channels=16, shared_levels=1, **kw), 0).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            enc(torch.randn(1, k, 1, 28, 28))
        return counter.get_total_flops() / 2

    squeezed = {k: macs(k, arch="squeezed") for k in (2, 4, 10)}
    # the docstring's figures: mix k*784, lift k*16*32*49, fuse 48*32*49, 3 blocks 9*32*32*49, head 32*16*49
    assert squeezed == {k: k * 784 + 49 * (k * 512 + 1536 + 3 * 9216 + 512) for k in (2, 4, 10)}
    assert squeezed[10] < 1.2 * squeezed[2]  # only the 1x1 lift runs per query
    assert 8 * squeezed[4] < macs(4)  # vs the `--preset cpu` U-Net


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])  # export's two `--exporter`s
def test_squeezed_encoder_exports_to_onnx_and_matches_torch(tmp_path, exporter: str) -> None:
    import onnxruntime as ort

    from export.onnx_export import export_onnx
    from runtime.manifest import ENCODER_IO

    torch.manual_seed(0)
    k = 3
    enc = build_encoders(_squeezed(k, rows=1, width=8, blocks=2, query_layers=2).to_dict()).eval()
    _randomise_head(enc)
    module = enc.encoders[0]
    path = export_onnx(module, (k, 1, 28, 28), tmp_path / "enc_0.onnx", input_name=ENCODER_IO[0],
                       output_name=ENCODER_IO[1], exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, k, 1, 28, 28)  # another batch size than the trace's
    (got,) = session.run(None, {ENCODER_IO[0]: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=0, atol=1e-4)


def test_train_config_validates_the_architecture_flags() -> None:
    from trainer.errors import EncoderTrainError
    from trainer.train_encoder import EncoderTrainConfig, config_from_args
    from trainer.train_encoder import _parser as parser

    def make(**kw) -> EncoderTrainConfig:
        return EncoderTrainConfig(classifier="c.pt", ideal_data="d.npz", out="o.pt", **kw)

    with pytest.raises(EncoderTrainError, match="arch must be one of"):
        make(arch="resnet")
    with pytest.raises(EncoderTrainError, match="squeeze must be one of"):
        make(squeeze=8)
    with pytest.raises(EncoderTrainError, match="blocks must be >= 0"):
        make(blocks=-1)
    with pytest.raises(EncoderTrainError, match="width must be >= 1"):
        make(width=0)
    args = parser().parse_args(["--classifier", "c.pt", "--ideal-data", "d.npz", "--out", "o.pt", "--preset", "cpu",
                                "--arch", "squeezed", "--squeeze", "2", "--width", "16", "--blocks", "0",
                                "--query-layers", "2"])
    cfg = config_from_args(args)
    assert (cfg.arch, cfg.squeeze, cfg.width, cfg.blocks, cfg.query_layers, cfg.steps) == (
        "squeezed", 2, 16, 0, 2, 250)
    with pytest.raises(SystemExit):
        parser().parse_args(["--classifier", "c", "--ideal-data", "d", "--out", "o", "--arch", "resnet"])
