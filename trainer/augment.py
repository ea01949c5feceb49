"""Training-time data augmentation: random translation of whole images.

Only the training batches are augmented; f itself is untouched, so it stays a bijection and
the embeddings of the real (unshifted) images are what encoders and serving see.
"""

from __future__ import annotations

import torch

from trainer.errors import ModelInputError


def random_shift(
    x: torch.Tensor, max_shift: int, fill: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate every image of (B, C, H, W) by its own (dy, dx), uniform in [-max_shift, max_shift]^2.

    Pixels shifted in from outside are `fill` (C,): the normalised value of a blank pixel, so a
    shifted digit sits on the same background as an unshifted one.
    """
    if max_shift < 0:
        raise ModelInputError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return x
    b, c, h, w = x.shape
    s = max_shift
    padded = fill.to(x.dtype).reshape(1, c, 1, 1).expand(b, c, h + 2 * s, w + 2 * s).clone()
    padded[:, :, s : s + h, s : s + w] = x
    # Window start (s + dy, s + dx) in the padded image: dy, dx in [-s, s].
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    rows = offsets[0][:, None] + torch.arange(h)  # (B, H)
    cols = offsets[1][:, None] + torch.arange(w)  # (B, W)
    batch = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
