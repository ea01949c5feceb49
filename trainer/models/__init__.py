"""Model definitions (no training loops): f, heads g, Manifold Mixup, classifier."""

from trainer.models.classifier import Classifier, ClassifierConfig, fingerprint, primary_logits_fn
from trainer.models.heads import Head, HeadConfig, default_heads
from trainer.models.iresnet import InverseReport, InvertibleNet, IResNetConfig
from trainer.models.mixup import MixInfo, sample_mix, soft_cross_entropy, soft_targets

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "Head",
    "HeadConfig",
    "InverseReport",
    "InvertibleNet",
    "IResNetConfig",
    "MixInfo",
    "default_heads",
    "fingerprint",
    "primary_logits_fn",
    "sample_mix",
    "soft_cross_entropy",
    "soft_targets",
]
