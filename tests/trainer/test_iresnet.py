"""f: squeeze, spectral normalisation of the conv operator, inverse, folding, fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.errors import InverseNotConverged, ModelConfigError
from trainer.models import InvertibleNet, IResNetConfig, fingerprint
from trainer.models.iresnet import ResidualBlock, Squeeze
from trainer.models.spectral import SpectralConv2d, conv_operator_norm

SMALL = IResNetConfig(in_shape=(1, 8, 8), stages=2, blocks_per_stage=(2, 2), hidden_channels=(8, 16))


def _stressed_net(seed: int = 0) -> InvertibleNet:
    """A net whose raw conv weights are far above the bound, so the scaling must act."""
    torch.manual_seed(seed)
    f = InvertibleNet(SMALL)
    with torch.no_grad():
        for m in f.modules():
            if isinstance(m, SpectralConv2d):
                m.weight.mul_(5.0)
    f.refine_spectral(100)
    return f.eval()


def test_embedding_has_input_size_and_shape() -> None:
    f = InvertibleNet(IResNetConfig())
    x = torch.randn(3, 1, 28, 28)
    z = f(x)
    assert tuple(z.shape) == (3, 16, 7, 7) == (3, *f.config.embedding_shape)
    assert z[0].numel() == x[0].numel()  # no injective padding


def test_squeeze_matches_pixel_unshuffle_and_inverts() -> None:
    sq = Squeeze((3, 6, 4))
    x = torch.randn(2, 3, 6, 4)
    y = sq(x)
    torch.testing.assert_close(y, F.pixel_unshuffle(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(sq.inverse(y), x, rtol=0, atol=0)


def test_conv_operator_norm_is_bounded_not_the_matrix_norm() -> None:
    torch.manual_seed(0)
    conv = SpectralConv2d(4, 8, 3, (8, 8), coeff=0.9)
    with torch.no_grad():
        conv.weight.mul_(10.0)
    conv.refine(200)
    conv.eval()
    with torch.no_grad():
        w = conv.effective_weight()
    op_norm = conv_operator_norm(w, (4, 8, 8), padding=1, n_iter=500, seed=1)
    assert op_norm <= 0.9 * (1 + 1e-3)
    np.testing.assert_allclose(op_norm, 0.9, rtol=1e-2)  # it is at the bound, not far below
    # The operator norm is not the reshaped-matrix norm torch's spectral_norm would bound.
    matrix_norm = float(torch.linalg.matrix_norm(w.reshape(8, -1), ord=2))
    assert abs(matrix_norm - op_norm) > 1e-2


def test_every_G_is_a_contraction() -> None:
    f = _stressed_net()
    bounds = f.lipschitz_bounds(n_iter=300)
    assert len(bounds) == 4
    assert max(bounds) < 1.0
    assert max(bounds) <= 0.9**3 * (1 + 1e-2)
    # Empirical check of the bound on random pairs (a lower bound on Lip(G)).
    gen = torch.Generator().manual_seed(0)
    for block, bound in zip([m for m in f.layers if isinstance(m, ResidualBlock)], bounds, strict=True):
        a = torch.randn(64, *block.shape, generator=gen)
        b = a + 1e-2 * torch.randn(64, *block.shape, generator=gen)
        with torch.no_grad():
            ratio = (block.G(a) - block.G(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
        assert float(ratio.max()) <= bound * (1 + 1e-4)


def test_round_trip_inverse() -> None:
    f = _stressed_net()
    x = torch.randn(16, *SMALL.in_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = f(x)
    x_hat, report = f.inverse(z, tol=1e-5, max_iter=50)
    assert report.converged and report.max_rel_residual <= 1e-5
    assert report.iterations <= 50 and len(report.iterations_per_block) == 4
    # Lip(f^-1) per block <= 1 / (1 - 0.729): a 1e-5 residual maps to well under 1e-4.
    np.testing.assert_allclose(x_hat.numpy(), x.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("k", [2, 4, 10])
def test_inverse_of_averaged_embeddings(k: int) -> None:
    f = _stressed_net()
    x = torch.randn(8 * k, *SMALL.in_shape, generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        z_avg = f(x).reshape(8, k, *SMALL.embedding_shape).mean(dim=1)  # off-manifold
        x_hat, report = f.inverse(z_avg, tol=1e-5, max_iter=50)
        residual = (f(x_hat) - z_avg).flatten(1).norm(dim=1) / z_avg.flatten(1).norm(dim=1)
    assert report.converged
    assert float(residual.max()) <= 1e-4
    np.testing.assert_allclose(report.max_rel_residual, float(residual.max()), rtol=1e-6)


def test_unconverged_inverse_raises_or_reports() -> None:
    f = _stressed_net()
    with torch.no_grad():
        z = f(torch.randn(4, *SMALL.in_shape))
    with pytest.raises(InverseNotConverged, match=r"did not converge: max relative residual") as info:
        f.inverse(z, tol=1e-6, max_iter=1)
    assert info.value.report.converged is False and info.value.x.shape == (4, 1, 8, 8)
    _, report = f.inverse(z, tol=1e-6, max_iter=1, raise_on_failure=False)
    assert not report.converged and report.iterations == 1 and report.max_rel_residual > 1e-6
    with pytest.raises(ValueError, match=r"expects z of shape \(B, 16, 2, 2\)"):
        f.inverse(torch.zeros(1, 4, 4, 4))


def test_inverse_leaves_training_mode_and_buffers_untouched() -> None:
    f = _stressed_net()
    f.train()
    before = {k: v.clone() for k, v in f.state_dict().items()}
    with torch.no_grad():
        f.eval()
        z = f(torch.randn(2, *SMALL.in_shape))
        f.train()
    f.inverse(z)
    assert f.training
    for k, v in f.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_folded_forward_matches_and_fingerprint() -> None:
    f = _stressed_net()
    folded = f.folded()
    assert not any(isinstance(m, SpectralConv2d) for m in folded.modules())
    x = torch.randn(5, *SMALL.in_shape)
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), f(x).numpy(), rtol=1e-6, atol=1e-6)
    h = fingerprint(f)
    assert h == fingerprint(f) == fingerprint(folded)
    assert len(h) == 64
    with torch.no_grad():
        next(m for m in f.modules() if isinstance(m, SpectralConv2d)).bias.add_(1e-3)
    assert fingerprint(f) != h


def test_config_validation() -> None:
    with pytest.raises(ModelConfigError, match=r"lipschitz_coeff must be in \(0, 0.9\]"):
        IResNetConfig(lipschitz_coeff=0.95)
    with pytest.raises(ModelConfigError, match=r"divisible by 2\*\*stages = 8"):
        IResNetConfig(in_shape=(1, 28, 28), stages=3, blocks_per_stage=(1, 1, 1),
                      hidden_channels=(4, 4, 4))
    with pytest.raises(ModelConfigError, match=r"one entry per stage"):
        IResNetConfig(blocks_per_stage=(1,))
    with pytest.raises(ModelConfigError, match=r"IResNetConfig: unknown key\(s\) \['hiden_channels'\]"):
        IResNetConfig.from_dict({"hiden_channels": [8, 8]})
    cfg = IResNetConfig.from_dict(SMALL.to_dict())
    assert cfg == SMALL
