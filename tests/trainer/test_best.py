"""The encoder checkpoint keeps the weights of the best validation score, not the last."""

from __future__ import annotations

import torch
from torch import nn

from trainer.best import BestWeights


def test_keeps_best_weights_and_their_info() -> None:
    layer = nn.Linear(2, 1)
    best = BestWeights()
    with torch.no_grad():
        layer.weight.fill_(1.0)
        assert best.update(0.5, layer, step=1)
        layer.weight.fill_(2.0)
        assert best.update(0.7, layer, step=2)
        layer.weight.fill_(3.0)
        assert not best.update(0.6, layer, step=3)  # worse: ignored
        assert not best.update(float("nan"), layer, step=4)
        assert not best.update(0.7, layer, step=5)  # tie keeps the earlier weights
    assert best.score == 0.7 and best.info == {"step": 2}
    torch.testing.assert_close(best.state_dict["weight"], torch.full((1, 2), 2.0))
    assert layer.weight[0, 0].item() == 3.0  # the live module is untouched
