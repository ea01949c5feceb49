"""Model definitions (no training loops): f, heads g, Manifold Mixup, classifier."""

from trainer.models.classifier import Classifier, ClassifierConfig, fingerprint
from trainer.models.heads import Head, HeadConfig, default_heads
from trainer.models.iresnet import (
    ConfigError,
    InverseNotConverged,
    InverseReport,
    InvertibleNet,
    IResNetConfig,
)
from trainer.models.mixup import MixInfo, sample_mix, soft_cross_entropy, soft_targets

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "ConfigError",
    "Head",
    "HeadConfig",
    "InverseNotConverged",
    "InverseReport",
    "InvertibleNet",
    "IResNetConfig",
    "MixInfo",
    "default_heads",
    "fingerprint",
    "sample_mix",
    "soft_cross_entropy",
    "soft_targets",
]
