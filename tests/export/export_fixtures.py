"""Tiny classifier / encoder / ParM checkpoints, built inside the tests (seconds on a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.checkpoint import save_checkpoint
from trainer.data import DATASETS
from trainer.models import Classifier, ClassifierConfig, IResNetConfig, default_heads, fingerprint
from trainer.models.encoder import EncoderConfig, ParityEncoders
from trainer.models.parm import ParityModel, ParMConfig

K = 2
COEFFICIENTS = [[0.5, 0.5]]


def tiny_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    config = ClassifierConfig(
        f=IResNetConfig(stages=1, blocks_per_stage=(2,), hidden_channels=(8,)),
        heads=default_heads("mnist", DATASETS["mnist"].class_names, 1),
        dataset="mnist",
    )
    model = Classifier(config)
    # Randomise the heads' BatchNorm statistics so the heads are not near-identity maps.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_classifier(path: Path, model: Classifier) -> Path:
    save_checkpoint(
        path, schema="coded-invnet/classifier", model_config=model.config.to_dict(),
        state_dict=model.state_dict(), train_config={"steps": 0}, metrics={"test_acc": 0.1},
        dataset="mnist", extra={"f_hash": fingerprint(model.f)},
    )
    return path


def save_encoders(path: Path, f_hash: str, k: int = K, coefficients: list[list[float]] | None = None,
                  **arch: object) -> Path:
    """`arch`: EncoderConfig fields (e.g. arch="squeezed", width=4) instead of the 4-channel U-Net's."""
    coefficients = coefficients or [[1.0 / k] * k]
    torch.manual_seed(1)
    config = EncoderConfig(in_channels=1, image_size=[28, 28], k=k, coefficients=coefficients,
                           **({"base_channels": 4} | arch))  # type: ignore[arg-type]
    model = ParityEncoders(config).eval()
    if config.arch == "squeezed":  # its head starts at zero (= the linear mix): give it weights to export
        for enc in model.encoders:
            torch.nn.init.normal_(enc.head.weight, std=0.3)
    save_checkpoint(
        path, schema="coded-invnet/encoder", model_config=config.to_dict(), state_dict=model.state_dict(),
        train_config={}, metrics={"val_acc_degraded": 0.2}, dataset="mnist",
        extra={"f_hash": f_hash, "coding": {"n": k + len(coefficients), "k": k, "coefficients": coefficients}},
    )
    return path


def save_parm(path: Path, base: Classifier, f_hash: str, k: int = K) -> Path:
    torch.manual_seed(2)
    config = ParMConfig(k=k, classifier=base.config.to_dict())
    body = Classifier(ClassifierConfig.from_dict(config.classifier))
    model = ParityModel(config, body).eval()
    save_checkpoint(
        path, schema="coded-invnet/parm", model_config=config.to_dict(), state_dict=model.state_dict(),
        train_config={}, metrics={"val_acc_labels": 0.3}, dataset="mnist", extra={"f_hash": f_hash},
    )
    return path
