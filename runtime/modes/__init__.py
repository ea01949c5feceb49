"""Serving modes: how one dispatch of coding groups becomes answers.

To add a serving mode: write one module here with a `Mode` subclass (runtime/modes/base.py
says what it must provide) and register it in `MODES` below; `--mode` takes its name.

Model names a worker can be asked to run (runtime/models.py):
  "f"         x [G, C, H, W]    -> z [G, *embedding_shape]
  "enc_f/<r>" x [G, k, C, H, W] -> z of encoder r's output (paper Remark 3)
  "parm"      x [G, k, C, H, W] -> logits_sum [G, classes of the primary head]
  "f_heads"   x [G, C, H, W]    -> every head's logits side by side [G, sum(classes)]
"""

from __future__ import annotations

from runtime.modes.approxifer import ApproxIFERMode
from runtime.modes.base import Mode, ModeOptions
from runtime.modes.coded import CodedMode
from runtime.modes.parm import ParMMode
from runtime.modes.uncoded import ReplicationMode, UncodedMode

MODES: dict[str, type[Mode]] = {
    "coded": CodedMode,
    "uncoded": UncodedMode,
    "replication": ReplicationMode,
    "parm": ParMMode,
    "approxifer": ApproxIFERMode,
}

__all__ = ["MODES", "Mode", "ModeOptions"]
