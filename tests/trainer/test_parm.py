"""ParM parity model: shapes, rebuild from config, and an exact decoder for an affine model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainer.coded_eval import evaluate_parm
from trainer.errors import ParMConfigError, ParMTrainError
from trainer.models.classifier import Classifier, ClassifierConfig
from trainer.models.heads import HeadConfig
from trainer.models.iresnet import IResNetConfig
from trainer.models.parm import ParityModel, ParMConfig, build_parm, parm_decode
from trainer.train_parm import ParMTrainConfig


class _AffineBody(nn.Module):
    """An affine 'classifier': f a 1x1 conv with bias, head flatten + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Conv2d(1, 2, 1)
        self.heads = nn.ModuleDict({"digit": nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 5))})


def _tiny_classifier_config() -> dict:
    f = IResNetConfig(in_shape=(1, 8, 8), stages=1, blocks_per_stage=(1,), hidden_channels=(4,))
    head = HeadConfig("digit", 3, ("a", "b", "c"), pool_size=2)
    return ClassifierConfig(f=f, heads=[head], dataset="mnist").to_dict()


@pytest.mark.parametrize("k", [2, 4, 10])
def test_affine_model_decodes_exactly(k: int) -> None:
    # For an affine base h, k * h(mean_j x_j) = sum_j h(x_j): the parity model built from
    # the base weights is exact, so subtracting the k-1 available outputs gives h(x_a).
    torch.manual_seed(k)
    body = _AffineBody()
    base = nn.Sequential(body.f, body.heads["digit"]).eval()
    parm = ParityModel(ParMConfig(k=k, classifier={}, input_mode="mean"), body).eval()
    x = torch.randn(6, k, 1, 8, 8)
    with torch.no_grad():
        logits = base(x.flatten(0, 1)).reshape(6, k, -1)  # (B, k, K)
        parity = parm(x)
        for a in range(k):
            rest = [i for i in range(k) if i != a]
            np.testing.assert_allclose(parm_decode(parity, logits[:, rest]).numpy(), logits[:, a].numpy(),
                                       rtol=0, atol=1e-4)
    # the evaluation loop must then agree with the base model at every erased position
    images = torch.randn(40, 1, 8, 8)
    groups = np.arange(40 - 40 % k).reshape(-1, k)
    labels = torch.randint(0, 5, (40,))
    res = evaluate_parm(base, parm, images, labels, groups, batch_size=3)
    assert res["acc_base"] == 1.0


def test_shapes_and_rebuild_from_config() -> None:
    torch.manual_seed(0)
    config = ParMConfig(k=4, classifier=_tiny_classifier_config())
    parm = ParityModel(config, Classifier(ClassifierConfig.from_dict(config.classifier))).eval()
    x = torch.randn(2, 4, 1, 8, 8)
    with torch.no_grad():
        out = parm(x)
        assert out.shape == (2, 3)
        again = build_parm(config.to_dict()).eval()
        again.load_state_dict(parm.state_dict())
        np.testing.assert_allclose(again(x).numpy(), out.numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ParM input must be"):
        parm(torch.randn(2, 3, 1, 8, 8))


def test_config_errors() -> None:
    with pytest.raises(ParMConfigError, match="input_mode must be one of"):
        ParMConfig(k=2, classifier={}, input_mode="max")
    with pytest.raises(ParMConfigError, match=r"ParMConfig: unknown key\(s\) \['kk'\]"):
        ParMConfig.from_dict({"k": 2, "classifier": {}, "kk": 1})
    with pytest.raises(ParMTrainError, match="k must be >= 2"):
        ParMTrainConfig(classifier="c.pt", out="p.pt", k=1)
