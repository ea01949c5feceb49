"""Keep a copy of a module's weights at its best validation score during training."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class BestWeights:
    """`update(score, module)` after each evaluation; `state_dict` holds the best weights.

    Higher scores are better; ties keep the earlier weights."""

    def __init__(self) -> None:
        self.score = float("-inf")
        self.state_dict: dict[str, Any] | None = None
        self.info: dict[str, Any] = {}

    def update(self, score: float, module: nn.Module, **info: Any) -> bool:
        """Record `module`'s weights if `score` beats the best so far; True when it did."""
        if not score > self.score:  # also refuses NaN
            return False
        self.score = float(score)
        self.state_dict = copy.deepcopy(module.state_dict())
        self.info = dict(info)
        return True
