"""The tower: Dice MLP 308 -> 256 -> 128 -> 64 -> 2, its input layout, and the 2-class loss.

Initialisation and numerics follow the MUSE reference (`model/base_model/layers.py`, `dice.py`,
`model/muse.py`). Every module that owns parameters initialises them in `reset_parameters`, so
a module built on the meta device and materialised later gets the reference init too.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DICE_ALPHA_INIT = -0.25
DICE_NORM_EPS = 1e-12
"""The reference's Dice uses a LayerNorm without affine and eps 1e-12."""
PROB_EPS = 1e-7
_TINY = torch.finfo(torch.float32).tiny
"""Added to the softmax before clipping to [0, 1], as the reference does."""


class ReferenceLinear(nn.Linear):
    """`nn.Linear` with the reference init: W ~ N(0, 1) / sqrt(fan_in), bias 0.1."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(self.in_features))
        nn.init.constant_(self.bias, 0.1)


class Dice(nn.Module):
    """Dice activation: p = sigmoid(LayerNorm(x)), y = p*x + alpha*(1-p)*x, alpha per unit.

    The reference normalises per sample over the units (LayerNorm, no affine), not over the
    batch, so the output does not depend on batch composition or train/eval mode.
    """

    def __init__(self, units: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(units, eps=DICE_NORM_EPS, elementwise_affine=False)
        self.alpha = nn.Parameter(torch.empty(units))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, DICE_ALPHA_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.norm(x))
        return p * x + self.alpha * (1.0 - p) * x


class Tower(nn.Module):
    """The MLP on the concatenated features; every Linear, the last included, is followed by Dice."""

    def __init__(self, input_dim: int = 308, hidden: Sequence[int] = (256, 128, 64), out: int = 2) -> None:
        super().__init__()
        widths = [input_dim, *hidden, out]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [ReferenceLinear(fan_in, fan_out), Dice(fan_out)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, input_dim) -> logits (B, out)."""
        return self.layers(features)


def tower_input_dim(embedding_dim: int, simtier_bins: int = 22) -> int:
    """Width of `tower_input`: 15D + 3*(D//2) + 2 SimTiers = 308 for D = 16."""
    attention_and_means = 4 * 2 * embedding_dim
    ad = 4 * embedding_dim
    user = 3 * embedding_dim + 3 * (embedding_dim // 2)
    return attention_and_means + ad + user + 2 * simtier_bins


def tower_input(
    *,
    short_attention: torch.Tensor,
    long_attention: torch.Tensor,
    long_mean: torch.Tensor,
    short_mean: torch.Tensor,
    ad: torch.Tensor,
    user: torch.Tensor,
    simtier_short: torch.Tensor,
    simtier_long: torch.Tensor,
) -> torch.Tensor:
    """Concatenate the tower's inputs (each (B, n)) in the reference's order; keywords only.

    ad = (205, 206, 213, 214) embeddings, user = (129_1, 130_1, 130_2 at D; 130_3..5 at D/2),
    each already concatenated by the caller in that order.
    """
    return torch.cat(
        [short_attention, long_attention, long_mean, short_mean, ad, user, simtier_short, simtier_long],
        dim=-1,
    )


def two_class_loss_and_prob(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 2-class cross-entropy and the click probability, as the reference computes them.

    prob = clip(softmax(logits) + 1e-7, 0, 1); per-row loss = -sum(onehot(label) * log(prob));
    loss = sum(weights * row_loss) / sum(weights), which with all weights 1 is the reference's
    plain mean. Weight-0 rows (padding of a rank's last batch) contribute nothing; a batch of
    padding only gives loss 0 with zero gradient. logits (B, 2), labels (B,) in {0., 1.},
    weights (B,). Returns (loss scalar, score = prob[:, 1] (B,)).
    """
    prob = (F.softmax(logits, dim=-1) + PROB_EPS).clamp(0.0, 1.0)
    onehot = torch.stack([1.0 - labels, labels], dim=-1)
    row_loss = -(onehot * torch.log(prob)).sum(dim=-1)
    total_weight = weights.sum().clamp_min(_TINY)  # a constant: this runs under torch.fx tracing
    return (weights * row_loss).sum() / total_weight, prob[:, 1]
