"""Coded evaluation: torch decoding vs the numpy coding scheme, Coded-InvNet with ideal
encoders, and ApproxIFER's exact properties (ParM's exact case is in test_parm.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kernels.berrut import BerrutCode
from kernels.coding import CodingScheme
from trainer.coded_eval import decode_embeddings, erasure_patterns, evaluate_approxifer, evaluate_coded, make_groups
from trainer.errors import CodedEvalError
from trainer.ideal_data import coding_matrix, ideal_targets
from trainer.models.iresnet import InvertibleNet, IResNetConfig


def test_groups_are_disjoint_seeded_and_capped() -> None:
    groups = make_groups(10, 3, None, seed=0)
    assert groups.shape == (3, 3) and len(set(groups.ravel())) == 9
    np.testing.assert_array_equal(make_groups(10, 3, None, seed=0), groups)
    assert make_groups(10, 3, 2, seed=0).shape == (2, 3)


def test_an_erasure_set_the_code_cannot_decode_is_refused() -> None:
    z = torch.zeros(1, 2, 3)
    with pytest.raises(CodedEvalError, match=r"leaves 1 parities for 2 unknowns"):
        decode_embeddings(torch.ones(1, 2), z, torch.zeros(1, 1, 3), (0, 1))


@pytest.mark.parametrize(("n", "k"), [(3, 2), (11, 10), (4, 2), (6, 4)])
def test_torch_decode_matches_coding_scheme(n: int, k: int) -> None:
    coeffs = coding_matrix(n, k)
    scheme = CodingScheme(n, k, coeffs)
    values = np.random.default_rng(0).normal(size=(k, 7))  # (k, D) one group
    results = np.concatenate([values, scheme.encode(values)])  # (n, D)
    patterns = erasure_patterns(n, k)
    assert all(min(p) < k and len(p) == n - k for p in patterns)
    for pattern in patterns:
        z = torch.tensor(values[None])  # (1, k, D)
        z_par = torch.tensor(results[None, k:])  # (1, R, D)
        missing, z_hat = decode_embeddings(torch.tensor(coeffs), z.clone().index_fill_(1, torch.tensor(pattern[:1]),
                                                                                  0.0), z_par, pattern)
        np.testing.assert_allclose(z_hat[0].numpy(), values[missing], rtol=0, atol=1e-9)
        survivors = [i for i in range(n) if i not in pattern]
        np.testing.assert_allclose(scheme.decode(survivors, results[survivors])[missing], z_hat[0].numpy(),
                                   rtol=0, atol=1e-9)


def test_evaluate_coded_with_ideal_encoder_agrees_with_base() -> None:
    # An "encoder" that returns the ideal targets f^-1(sum_j C[r, j] f(x_j)) makes every
    # rebuilt prediction equal the base model's prediction (tiny f, inverse tol 1e-6).
    torch.manual_seed(0)
    f = InvertibleNet(IResNetConfig(in_shape=(1, 8, 8), stages=1, blocks_per_stage=(2,), hidden_channels=(8,),
                                    lipschitz_coeff=0.5))  # strongly contractive: the inverse converges fast
    with torch.no_grad():
        for _ in range(10):
            f(torch.randn(4, 1, 8, 8))
    f.eval()
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6)).eval()
    coeffs = torch.tensor(coding_matrix(6, 4), dtype=torch.float32)

    class Ideal(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return ideal_targets(f, x, coeffs, 1e-6, 300)[0]

    images = torch.randn(12, 1, 8, 8)
    labels = torch.randint(0, 6, (12,))
    res = evaluate_coded(f, head, Ideal(), images, labels, np.arange(12).reshape(3, 4), batch_size=4,
                         coefficients=coeffs)
    assert res.acc_base == 1.0
    assert len(res.per_pattern) == 15 - 1  # C(6, 2) patterns minus the parity-only one


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
