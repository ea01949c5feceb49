"""Coded evaluation: degraded-mode accuracy of Coded-InvNet, ParM and ApproxIFER.

One library for the training commands (validation scores, best-weights selection) and for
`python -m bench accuracy` (the test-split table), so both score exactly the same way:
the data is cut into disjoint k-tuples (`make_groups`), every erasure pattern is applied,
the erased queries are rebuilt, and their predictions are compared with the true labels
and with the base model's own predictions; patterns are weighted equally.

Notation: B groups, k queries, R = n - k parity rows, C x H x W image, D = numel(f(x)),
K classes of the primary head.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.errors import CodedEvalError
from trainer.models.parm import parm_decode


def make_groups(num_examples: int, k: int, max_groups: int | None, seed: int) -> np.ndarray:
    """Disjoint k-tuples of a seeded permutation: (G, k) indices, G = min(N // k, max_groups)."""
    perm = np.random.default_rng(seed).permutation(num_examples)
    g = num_examples // k if max_groups is None else min(num_examples // k, max_groups)
    return perm[: g * k].reshape(g, k)


# -- Coded-InvNet: decoding in torch (differentiable; same algebra as kernels.coding) ---------


def erasure_patterns(n: int, k: int) -> list[tuple[int, ...]]:
    """Every set of n-k erased workers that hits at least one systematic worker (id < k)."""
    return [e for e in itertools.combinations(range(n), n - k) if min(e) < k]


def decode_embeddings(
    coefficients: torch.Tensor, z: torch.Tensor, z_par: torch.Tensor, erased: tuple[int, ...]
) -> tuple[list[int], torch.Tensor]:
    """Rebuild the erased systematic embeddings from the k surviving workers.

    coefficients C (R, k); z (B, k, D) systematic embeddings (erased ones are ignored);
    z_par (B, R, D) parity embeddings f(Enc_r(x)). Returns (missing ids, (B, |missing|, D)).
    """
    k = coefficients.shape[1]
    missing = [j for j in erased if j < k]
    received = [j for j in range(k) if j not in erased]
    parities = [p - k for p in range(k, k + coefficients.shape[0]) if p not in erased]
    if len(parities) != len(missing):
        raise CodedEvalError(f"erasure set {erased} leaves {len(parities)} parities for {len(missing)} unknowns")
    c = coefficients.to(z.dtype)
    rhs = z_par[:, parities] - torch.einsum("pj,bjd->bpd", c[parities][:, received], z[:, received])  # (B, e, D)
    system = c[parities][:, missing]  # (e, e)
    return missing, torch.linalg.solve(system, rhs)  # (B, e, D)


@dataclass
class DegradedResult:
    acc_labels: float  # degraded-mode accuracy vs true labels, mean over erasure patterns
    acc_base: float  # agreement with the base model's prediction, mean over erasure patterns
    per_pattern: dict[str, dict[str, float]]
    groups: int


@torch.no_grad()
def evaluate_coded(
    f: nn.Module,
    head: nn.Module,
    encoders: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: np.ndarray,
    batch_size: int = 64,
    coefficients: torch.Tensor | None = None,
) -> DegradedResult:
    """Degraded-mode accuracy of Coded-InvNet over every erasure pattern (see erasure_patterns).

    encoders maps x (B, k, C, H, W) -> (B, R, C, H, W); coefficients C (R, k) defaults to a
    ParityEncoders' config. images (N, C, H, W) normalised, labels (N,), groups (G, k) indices.
    """
    encoders.eval()
    if coefficients is None:
        coefficients = torch.tensor(encoders.config.coefficients, dtype=torch.float32)  # (R, k)
    R, k = coefficients.shape
    patterns = erasure_patterns(k + R, k)
    hits = {p: [0, 0, 0] for p in patterns}  # pattern -> [correct vs labels, agree with base, count]
    for start in range(0, len(groups), batch_size):
        idx = torch.as_tensor(groups[start : start + batch_size])  # (B, k)
        x = images[idx]  # (B, k, C, H, W)
        B = x.shape[0]
        z = f(x.flatten(0, 1))  # (B*k, *emb)
        emb = z.shape[1:]
        z = z.reshape(B, k, -1)  # (B, k, D)
        base_pred = head(z.reshape(B * k, *emb)).argmax(1).reshape(B, k)
        z_par = f(encoders(x).flatten(0, 1)).reshape(B, R, -1)  # (B, R, D)
        y = labels[idx]  # (B, k)
        for pattern in patterns:
            missing, z_hat = decode_embeddings(coefficients, z, z_par, pattern)  # (B, e, D)
            pred = head(z_hat.reshape(-1, *emb)).argmax(1).reshape(B, len(missing))
            hits[pattern][0] += int((pred == y[:, missing]).sum())
            hits[pattern][1] += int((pred == base_pred[:, missing]).sum())
            hits[pattern][2] += pred.numel()
    per = {
        ",".join(map(str, p)): {"acc_labels": h[0] / h[2], "acc_base": h[1] / h[2]} for p, h in hits.items()
    }
    return DegradedResult(
        acc_labels=float(np.mean([v["acc_labels"] for v in per.values()])),
        acc_base=float(np.mean([v["acc_base"] for v in per.values()])),
        per_pattern=per,
        groups=len(groups),
    )


# -- ParM: one parity model, one erasure --------------------------------------------------------


@torch.no_grad()
def evaluate_parm(
    base: nn.Module,
    parm: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: np.ndarray,
    batch_size: int = 64,
) -> dict[str, float]:
    """Degraded-mode accuracy of ParM, averaged over every erased position a in 0..k-1.

    base maps x (B, C, H, W) -> primary logits (B, K); parm maps x (B, k, C, H, W) -> (B, K);
    images (N, C, H, W); groups (G, k).
    """
    parm.eval()
    k = groups.shape[1]
    hits = np.zeros((k, 2), dtype=np.int64)  # per erased position: [vs labels, vs base]
    for start in range(0, len(groups), batch_size):
        idx = torch.as_tensor(groups[start : start + batch_size])  # (B, k)
        x = images[idx]  # (B, k, C, H, W)
        B = x.shape[0]
        logits = base(x.flatten(0, 1)).reshape(B, k, -1)  # (B, k, K)
        base_pred = logits.argmax(2)  # (B, k)
        parity = parm(x)  # (B, K)
        y = labels[idx]
        for a in range(k):
            rest = [i for i in range(k) if i != a]
            pred = parm_decode(parity, logits[:, rest]).argmax(1)  # (B,)
            hits[a, 0] += int((pred == y[:, a]).sum())
            hits[a, 1] += int((pred == base_pred[:, a]).sum())
    total = len(groups)
    return {"acc_labels": float(hits[:, 0].mean() / total), "acc_base": float(hits[:, 1].mean() / total)}


# -- ApproxIFER: training-free Berrut interpolation ---------------------------------------------


@torch.no_grad()
def evaluate_approxifer(
    base: nn.Module, images: torch.Tensor, labels: torch.Tensor, groups: np.ndarray, n: int, batch_size: int = 64
) -> dict[str, Any]:
    """ApproxIFER: Berrut-encode the k queries at n points, run the unmodified model on every
    coded input, decode the logits of all k queries from each set of k surviving workers.

    It has no systematic workers, so every one of the C(n, n-k) patterns is scored and all k
    queries are rebuilt; `normal_acc_labels` uses all n workers (still an approximation).
    """
    from kernels.berrut import BerrutCode

    k = groups.shape[1]
    code = BerrutCode(n, k)
    enc = torch.as_tensor(code.encoding_matrix(), dtype=torch.float32)  # (n, k)
    patterns = list(itertools.combinations(range(n), n - k))
    decs = {p: torch.as_tensor(code.decoding_matrix([i for i in range(n) if i not in p]), dtype=torch.float32)
            for p in patterns}  # pattern -> (k, k)
    dec_all = torch.as_tensor(code.decoding_matrix(list(range(n))), dtype=torch.float32)  # (k, n)
    hits = {p: np.zeros(2, dtype=np.int64) for p in [(), *patterns]}
    for start in range(0, len(groups), batch_size):
        idx = torch.as_tensor(groups[start : start + batch_size])  # (B, k)
        x = images[idx]  # (B, k, C, H, W)
        B = x.shape[0]
        base_pred = base(x.flatten(0, 1)).argmax(1).reshape(B, k)
        coded = torch.einsum("nk,bkchw->bnchw", enc, x)  # (B, n, C, H, W)
        y = base(coded.flatten(0, 1)).reshape(B, n, -1)  # (B, n, K)
        for p in hits:
            if p:
                avail = [i for i in range(n) if i not in p]
                logits = torch.einsum("km,bmc->bkc", decs[p], y[:, avail])  # (B, k, K)
            else:
                logits = torch.einsum("kn,bnc->bkc", dec_all, y)
            pred = logits.argmax(2)
            hits[p] += [int((pred == labels[idx]).sum()), int((pred == base_pred).sum())]
    total = len(groups) * k
    degraded = [hits[p] / total for p in patterns]
    return {
        "acc_labels": float(np.mean([d[0] for d in degraded])),
        "acc_base": float(np.mean([d[1] for d in degraded])),
        "normal_acc_labels": float(hits[()][0] / total),
        "patterns": len(patterns),
    }
