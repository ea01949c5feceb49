"""`python -m runtime COMMAND ...`: serve a Coded-InvNet bundle over KServe v2 HTTP."""

from __future__ import annotations

from kernels.commands import dispatch

COMMANDS = {
    "serve": ("runtime.serve", "serve a bundle directory (KServe v2 HTTP + Prometheus metrics)"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m runtime", __doc__ or "", COMMANDS, argv)
