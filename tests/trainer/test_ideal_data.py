"""Ideal-encoding targets: f(t_r) matches the mixed embedding, and decoding with the ideal
encoder recovers the erased embedding f(x_a)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.coding import CodingScheme
from trainer.ideal_data import (
    IdealDataConfig,
    IdealDataError,
    build_ideal_data,
    coding_matrix,
    ideal_targets,
    sample_groups,
)
from trainer.models.iresnet import InvertibleNet, IResNetConfig


@pytest.fixture(scope="module")
def tiny_f() -> InvertibleNet:
    torch.manual_seed(0)
    f = InvertibleNet(IResNetConfig(in_shape=(1, 8, 8), stages=1, blocks_per_stage=(2,), hidden_channels=(8,)))
    f.train()
    with torch.no_grad():
        for _ in range(20):  # settle the power-iteration estimates so sigma is accurate
            f(torch.randn(4, 1, 8, 8))
    return f.eval()


@pytest.mark.parametrize(("n", "k"), [(3, 2), (5, 4), (4, 2), (6, 4)])
def test_ideal_encoder_decodes_erased_embeddings(tiny_f: InvertibleNet, n: int, k: int) -> None:
    coeffs = coding_matrix(n, k)
    scheme = CodingScheme(n, k, coeffs)
    x = torch.randn(3, k, 1, 8, 8)  # 3 groups
    targets, residuals = ideal_targets(tiny_f, x, torch.as_tensor(coeffs, dtype=torch.float32), 1e-6, 200)
    assert targets.shape == (3, n - k, 1, 8, 8)
    assert float(residuals.max()) < 1e-5
    with torch.no_grad():
        z = tiny_f(x.reshape(3 * k, 1, 8, 8)).reshape(3, k, -1).double().numpy()  # (G, k, D)
        z_par = tiny_f(targets.reshape(3 * (n - k), 1, 8, 8)).reshape(3, n - k, -1).double().numpy()
    # erase the first n-k systematic workers: the parities computed by f on the ideal
    # encodings must give back their embeddings
    for g in range(3):
        erased = list(range(n - k))
        indices = [i for i in range(k) if i not in erased] + list(range(k, n))
        results = np.concatenate([z[g, [i for i in range(k) if i not in erased]], z_par[g]])
        decoded = scheme.decode(indices, results)
        # inverse residual 1e-6 relative, amplified by the decode (at most ~30x here) -> 1e-4 absolute
        np.testing.assert_allclose(decoded, z[g], rtol=0, atol=1e-4)


def test_build_drops_unconverged(tiny_f: InvertibleNet) -> None:
    images = torch.randn(40, 1, 8, 8)
    pool = np.arange(10, 40)
    coeffs = coding_matrix(3, 2)
    kept = build_ideal_data(tiny_f, images, pool, coeffs, groups=12, batch_size=5, inverse_tol=1e-6,
                            inverse_max_iter=200, max_residual=1e-4, seed=0)
    assert kept["dropped_fraction"] == 0.0
    assert kept["indices"].shape == (12, 2) and kept["targets"].shape == (12, 1, 1, 8, 8)
    assert np.all(np.isin(kept["indices"], pool))
    # one fixed-point iteration cannot converge: every group is dropped and reported
    starved = build_ideal_data(tiny_f, images, pool, coeffs, groups=12, batch_size=5, inverse_tol=1e-6,
                               inverse_max_iter=1, max_residual=1e-6, seed=0)
    assert starved["dropped_fraction"] == 1.0 and len(starved["indices"]) == 0


def test_sample_groups_distinct() -> None:
    groups = sample_groups(np.random.default_rng(0), np.arange(100, 110), 500, 4)
    assert groups.shape == (500, 4)
    assert all(len(set(row)) == 4 for row in groups.tolist())
    with pytest.raises(IdealDataError, match="pool has 3"):
        sample_groups(np.random.default_rng(0), np.arange(3), 5, 4)


def test_config_and_scheme_errors() -> None:
    with pytest.raises(IdealDataError, match="need n > k"):
        IdealDataConfig(classifier="c.pt", out="o.npz", n=4, k=4)
    with pytest.raises(IdealDataError, match="one parity row"):
        coding_matrix(6, 4, "average")
    np.testing.assert_allclose(coding_matrix(5, 4), [[0.25] * 4], rtol=0, atol=0)
    np.testing.assert_allclose(coding_matrix(4, 2), [[1 / 2, 1 / 2], [1 / 3, 2 / 3]], rtol=0, atol=1e-15)
