"""random_shift: every output image is its input translated by at most max_shift, blank-filled."""

from __future__ import annotations

import pytest
import torch

from trainer.augment import random_shift


def shifted(image: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """Reference: out[:, i, j] = image[:, i + dy, j + dx] where inside, else fill."""
    c, h, w = image.shape
    out = fill.reshape(c, 1, 1).expand(c, h, w).clone()
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = image[:, i + dy, j + dx]
    return out


def test_each_image_is_a_translation_within_range() -> None:
    x = torch.randn(64, 2, 6, 7)
    fill = torch.tensor([-0.5, 3.0])
    out = random_shift(x, 2, fill, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = set()
    for image, result in zip(x, out, strict=True):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(result, shifted(image, dy, dx, fill))]
        assert matches, "an output image is not a translation of its input by <= 2 pixels"
        seen.update(matches)
    assert len(seen) > 10  # offsets vary per image, not one shift for the whole batch


def test_zero_shift_is_identity_and_seeded_calls_repeat() -> None:
    x = torch.randn(4, 1, 5, 5)
    fill = torch.zeros(1)
    assert random_shift(x, 0, fill) is x
    a = random_shift(x, 1, fill, torch.Generator().manual_seed(7))
    b = random_shift(x, 1, fill, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        random_shift(x, -1, fill)
