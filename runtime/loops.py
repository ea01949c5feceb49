"""Event-loop factory: uvloop when installed, plain asyncio otherwise (uvicorn's loops/auto)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """(factory, name) for asyncio.Runner(loop_factory=...)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop, "asyncio"
    return uvloop.new_event_loop, "uvloop"
