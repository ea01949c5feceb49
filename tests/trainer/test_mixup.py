"""Manifold Mixup: layer choice, lambda, soft targets, and where the mixing happens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.models import Classifier, ClassifierConfig, HeadConfig, IResNetConfig
from trainer.models.mixup import MixInfo, mix, sample_mix, soft_cross_entropy, soft_targets

F_CFG = IResNetConfig(in_shape=(1, 8, 8), stages=2, blocks_per_stage=(1, 2), hidden_channels=(4, 8))


def _model() -> Classifier:
    torch.manual_seed(0)
    heads = [
        HeadConfig("digit", 4, ("a", "b", "c", "d"), pool_size=2),
        HeadConfig("parity", 2, ("even", "odd"), pool_size=1, label_map=(0, 1, 0, 1)),
    ]
    return Classifier(ClassifierConfig(f=F_CFG, heads=heads, dataset="mnist")).eval()


def test_soft_targets_are_the_lambda_mixture() -> None:
    labels = torch.tensor([0, 1, 2, 3, 1])
    info = MixInfo(mix_point=0, lam=0.3, perm=torch.tensor([4, 3, 2, 1, 0]))
    t = soft_targets(labels, 4, info)
    expected = np.zeros((5, 4), dtype=np.float32)
    for i, (a, b) in enumerate(zip([0, 1, 2, 3, 1], [1, 3, 2, 1, 0], strict=True)):
        expected[i, a] += 0.3
        expected[i, b] += 0.7
    np.testing.assert_allclose(t.numpy(), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(t.sum(dim=1).numpy(), np.ones(5), atol=1e-6)


def test_sample_mix_is_seeded_and_in_range() -> None:
    a = sample_mix(16, 5, 1.0, torch.Generator().manual_seed(7))
    b = sample_mix(16, 5, 1.0, torch.Generator().manual_seed(7))
    assert (a.mix_point, a.lam) == (b.mix_point, b.lam) and torch.equal(a.perm, b.perm)
    gen = torch.Generator().manual_seed(0)
    draws = [sample_mix(4, 5, 1.0, gen) for _ in range(2000)]
    lams = np.array([d.lam for d in draws])
    points = np.array([d.mix_point for d in draws])
    assert lams.min() > 0 and lams.max() < 1
    # Beta(1, 1) is uniform: mean 1/2, variance 1/12; the layer is uniform over 0..4.
    np.testing.assert_allclose(lams.mean(), 0.5, atol=0.03)
    np.testing.assert_allclose(lams.var(), 1 / 12, atol=0.01)
    assert set(points.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match=r"alpha must be > 0"):
        sample_mix(4, 5, 0.0)


def test_mixing_at_the_input_is_plain_input_mixup() -> None:
    model = _model()
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    info = MixInfo(mix_point=0, lam=0.25, perm=torch.tensor([5, 4, 3, 2, 1, 0]))
    with torch.no_grad():
        logits, targets, _ = model.forward_mixup(x, y, info=info)
        expected = model(0.25 * x + 0.75 * x[info.perm])
    for task in ("digit", "parity"):
        np.testing.assert_allclose(logits[task].numpy(), expected[task].numpy(), atol=1e-5)
    parity = torch.tensor([0, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(
        targets["parity"].numpy(),
        (0.25 * F.one_hot(parity, 2) + 0.75 * F.one_hot(parity[info.perm], 2)).numpy(),
        atol=1e-7,
    )


def test_mixing_after_the_last_block_mixes_embeddings() -> None:
    model = _model()
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    last = model.f.num_mix_points - 1
    assert last == 3
    info = MixInfo(mix_point=last, lam=0.6, perm=torch.tensor([1, 0, 3, 2]))
    with torch.no_grad():
        logits, _, _ = model.forward_mixup(x, y, info=info)
        z = model.f(x)
        expected = model.heads_forward(mix(z, info))
        not_input = model(0.6 * x + 0.4 * x[info.perm])
    np.testing.assert_allclose(logits["digit"].numpy(), expected["digit"].numpy(), atol=1e-5)
    # Mixing embeddings is not the same as mixing inputs (f is nonlinear).
    assert not np.allclose(logits["digit"].numpy(), not_input["digit"].numpy(), atol=1e-4)


def test_soft_cross_entropy_matches_hard_labels() -> None:
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 2, 1, 1, 0])
    np.testing.assert_allclose(
        float(soft_cross_entropy(logits, F.one_hot(labels, 3).float())),
        float(F.cross_entropy(logits, labels)),
        rtol=1e-6,
    )
