"""`python -m trainer COMMAND ...`: training and evaluation of f, g, encoders and ParM."""

from __future__ import annotations

from kernels.commands import dispatch

COMMANDS = {
    "classifier": ("trainer.train_classifier", "train the invertible classifier f + heads g"),
    "evaluate": ("trainer.evaluate", "accuracy and inverse-convergence report of a classifier"),
    "ideal-data": ("trainer.ideal_data", "build cached ideal-encoding targets f^-1(sum c f(x))"),
    "encoder": ("trainer.train_encoder", "train the Coded-InvNet parity encoders"),
    "parm": ("trainer.train_parm", "train the ParM parity-model baseline"),
    "train-all": ("trainer.pipeline", "re-train every checkpoint `bench accuracy` reads (resumable)"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m trainer", __doc__ or "", COMMANDS, argv)
