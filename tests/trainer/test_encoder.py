"""Parity encoder: order invariance, output shapes, config validation, discriminator shape."""

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
    build_encoders,
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


@pytest.mark.parametrize("shared_levels", [1, 2, 3])
def test_permutation_invariant(shared_levels: int) -> None:
    # unequal coefficients: permuting (query, coefficient) pairs together must not change the output
    torch.manual_seed(0)
    k = 4
    config = _config(k, rows=1, shared_levels=shared_levels)
    enc = ParityEncoders(config).eval()
    x = torch.randn(2, k, 1, 28, 28)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = ParityEncoders(
        EncoderConfig.from_dict({**config.to_dict(), "coefficients": [[config.coefficients[0][i] for i in perm]]})
    ).eval()
    permuted.load_state_dict({**enc.state_dict(), "encoders.0.coefficients": enc.encoders[0].coefficients[perm]})
    with torch.no_grad():
        np.testing.assert_allclose(permuted(x[:, perm]).numpy(), enc(x).numpy(), rtol=0, atol=1e-5)


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
