"""What every part of one engine shares: options, bundle, models, metrics, threads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.compute_threads import ComputeThreads
from runtime.config import ServerConfig
from runtime.manifest import Manifest
from runtime.metrics import Metrics
from runtime.models import ModelFactory


@dataclass(frozen=True)
class EngineContext:
    config: ServerConfig
    manifest: Manifest
    bundle_dir: Path
    metrics: Metrics
    threads: ComputeThreads  # the compute threads shared by the frontend and thread workers
    models: ModelFactory
