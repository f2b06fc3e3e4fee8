"""ESU: SimTier, SA-TA over the top-K, DIN-like target attention over the last 50, mean pools.

Reference semantics by default (MUSE `model/base_model/simtier.py`, `layers.py`): no mask, so
pads enter softmaxes, means and SimTier counts with cosine 0 and zero embeddings. Every module
and `mean_pool` take an optional `mask` (B, N) bool, True = a real behaviour: the corrected,
masked variant, where masked positions carry no weight at all.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse_rec.model.tower import ReferenceLinear

ATTENTION_EPS = 1e-7
"""The reference adds 1e-7 to every softmax weight."""


def attention_pool(
    scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, eps: float = ATTENTION_EPS
) -> torch.Tensor:
    """sum_N (softmax_N(scores) + eps) * values: (B, N), (B, N, d) -> (B, d); eps is the
    reference's 1e-7 unless a caller (lemur's history attention) pools without it.

    Masked variant: masked scores are set to the lowest float (a finite -inf, so that a row with
    no real behaviour gives uniform, then zeroed, weights instead of NaN), and masked weights,
    eps included, are zeroed: such a row pools to 0.
    """
    if mask is None:
        weights = F.softmax(scores, dim=-1) + eps
    else:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = (F.softmax(scores, dim=-1) + eps) * mask
    return torch.einsum("bn,bnd->bd", weights, values)


def mean_pool(sequence: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of (B, N, d) over N -> (B, d). Reference: over all N, pads included; masked: real ones only."""
    if mask is None:
        return sequence.mean(dim=1)
    total = (sequence * mask.unsqueeze(-1)).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp_min(1)


class SimTier(nn.Module):
    """Histogram of a similarity sequence: log(count + 1) per cosine bin, times a learned weight.

    bin = ceil(cos * 10) + 10 for 22 bins: cos = -1 alone falls in bin 0, (-1, -0.9] in bin 1,
    ..., (0.9, 1] in bin 20; bin 21 only catches rounding above 1 (clamped for safety, a no-op for
    any cosine in [-1, 1.1]). No length normalisation, as in the reference.
    """

    def __init__(self, bins: int = 22) -> None:
        super().__init__()
        if bins < 4 or bins % 2:
            raise ValueError(f"SimTier: expected an even number of bins >= 4, found {bins}")
        self.bins = bins
        self.steps_per_unit = (bins - 2) // 2
        self.weight = nn.Parameter(torch.empty(bins))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.weight, 0.0, 1.0)

    def forward(self, similarity: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """similarity (B, N) cosines -> (B, bins)."""
        ids = torch.ceil(similarity * float(self.steps_per_unit)).long() + self.steps_per_unit
        ids = ids.clamp(0, self.bins - 1)
        increments = torch.ones_like(similarity) if mask is None else mask.to(similarity.dtype)
        counts = similarity.new_zeros(similarity.shape[0], self.bins).scatter_add_(1, ids, increments)
        return torch.log(counts + 1.0) * self.weight


class SelfAttentiveTargetAttention(nn.Module):
    """SA-TA: target attention over the top-K whose logits mix ID attention with the SCL cosine.

    q = SiLU(Wq target), k = SiLU(Wk seq), v = SiLU(Wv seq); a_id = k.q (no 1/sqrt(d));
    b = R / tau; a = g1*a_id + g2*b + g3*a_id*b; out = sum_K (softmax_K(a) + 1e-7) * v.

    `tau` has two entries because the reference allocates one temperature per similarity
    sequence it can add (R1/tau1 + R2/tau2, `cosine_tau1` of shape [2, heads]) and MUSE passes
    one: tau[1] is never read and gets a zero gradient. It is kept so that the dense parameter
    count (126,165 at D = 16) and the optimizer's view of the parameters match the reference.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = ReferenceLinear(dim, dim)
        self.key = ReferenceLinear(dim, dim)
        self.value = ReferenceLinear(dim, dim)
        self.tau = nn.Parameter(torch.empty(2))
        self.gates = nn.Parameter(torch.empty(3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.tau, 0.1)
        nn.init.constant_(self.gates, 1.0)

    def forward(
        self,
        target: torch.Tensor,
        sequence: torch.Tensor,
        similarity: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """target (B, dim), sequence (B, K, dim), similarity R (B, K) -> (B, dim)."""
        query = F.silu(self.query(target))
        keys = F.silu(self.key(sequence))
        values = F.silu(self.value(sequence))
        id_scores = torch.einsum("bkd,bd->bk", keys, query)
        semantic_scores = similarity / self.tau[0]
        g1, g2, g3 = self.gates
        scores = g1 * id_scores + g2 * semantic_scores + g3 * id_scores * semantic_scores
        return attention_pool(scores, values, mask)


class TargetAttention(nn.Module):
    """DIN-like target attention over the short sequence; the projected keys double as values.

    q = Wq target, keys = Wk seq, score = keys.q (no activation, no scaling),
    out = sum_N (softmax_N(score) + 1e-7) * keys.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = ReferenceLinear(dim, dim)
        self.key = ReferenceLinear(dim, dim)

    def forward(self, target: torch.Tensor, sequence: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """target (B, dim), sequence (B, N, dim) -> (B, dim)."""
        query = self.query(target)
        keys = self.key(sequence)
        return attention_pool(torch.einsum("bnd,bd->bn", keys, query), keys, mask)
