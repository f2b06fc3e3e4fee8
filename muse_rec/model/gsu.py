"""GSU: reduce the 1000-long behaviour sequence to K positions. Pure tensor functions, no parameters.

The caller runs them under `torch.no_grad()` and gathers whatever it needs (IDs, SCL keys,
embeddings) at the returned positions with `gather_positions`. Sequences are left-padded, so a
higher position is a more recent behaviour. Semantics follow the MUSE reference code
(`utils/utils.py`: `get_cosine`, `sim_mm_top_k`, `sim_soft_top_k`, `sim_hard_top_k`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZE_EPS = 1e-12
"""`F.normalize`'s default, as in the reference: a zero vector stays zero, so its cosine is 0."""
NO_SCORE = -1.1
"""The reference's score for positions whose cosine is exactly 0.0 (pads, items without SCL)."""


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """Cosine along the last dim, broadcasting the others; 0 where either vector is zero.

    Each side is divided by max(norm, eps) before the dot product (the reference's `get_cosine`),
    so zero vectors give exactly 0, never NaN. Scale invariant: int8 SCL values dequantised by
    /127 give the same cosines as the reference's raw int8 -> float cast.
    """
    return (F.normalize(a, dim=-1, eps=eps) * F.normalize(b, dim=-1, eps=eps)).sum(dim=-1)


def cosines(target: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """Cosines (B, L) of `target` (B, d) with each of `sequence` (B, L, d); 0 where either vector is
    zero. A batched matmul, as in the reference, so no (B, L, d) product is materialised."""
    return unit_cosines(target, unit(sequence))


def unit(x: torch.Tensor) -> torch.Tensor:
    """`x` divided by max(norm, eps) along the last dim: each side of `cosine`."""
    return F.normalize(x, dim=-1, eps=NORMALIZE_EPS)


def unit_cosines(target: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`cosines` of `target` (B, d) with `keys` (B, L, d) = `unit(sequence)`, bit for bit: a history
    that several impressions share is normalised once (lemur)."""
    return torch.bmm(keys, unit(target).unsqueeze(-1)).squeeze(-1)


def scl_cosines(target: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """Cosines (B, L) like `cosines`, computed as dot / (|a| |b|) with the products first: for the
    integer-valued SCL vectors (int8 values, exact in fp16 and float32) every product and squared
    norm is an integer below 2**24 (128 x 127 x 127), which float32 holds exactly whatever the
    kernel's summation order, so equal cosines tie exactly on any machine, and the loader's GSU
    (`muse_rec.data.gsu`) gets the very same numbers. Differs from `cosines` by rounding only."""
    dots = torch.einsum("bld,bd->bl", sequence, target).double()
    norms = torch.einsum("bd,bd->b", target, target).double().sqrt().unsqueeze(-1) * torch.einsum("bld,bld->bl", sequence, sequence).double().sqrt()
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0).float()


def scores_of(cosine_values: torch.Tensor) -> torch.Tensor:
    """GSU scores from cosines: a cosine of exactly 0.0 marks a pad or an item without an SCL
    vector (zero vector) and is pushed to -1.1, below every real cosine, as in the reference; an
    exactly orthogonal real pair gets -1.1 too (reference behaviour)."""
    return cosine_values.masked_fill(cosine_values == 0.0, NO_SCORE)


def gsu_scores(target: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """GSU scores (B, L) of `target` (B, d) against `sequence` (B, L, d): cosine, 0.0 -> -1.1.
    Used by `muse` (SCL vectors) and `sim_soft` (see `sim_soft_scores`)."""
    return scores_of(cosines(target, sequence))


def sim_soft_scores(
    target_item: torch.Tensor,
    target_category: torch.Tensor,
    sequence_items: torch.Tensor,
    sequence_categories: torch.Tensor,
) -> torch.Tensor:
    """`sim_soft` GSU scores: `gsu_scores` over concat(item, category) ID embeddings.

    Targets are (B, D), sequences (B, L, D); the caller passes the current trainable embeddings
    (the GSU runs without gradient).
    """
    return gsu_scores(
        torch.cat([target_item, target_category], dim=-1),
        torch.cat([sequence_items, sequence_categories], dim=-1),
    )


def _check_k(k: int, length: int) -> None:
    if not 0 < k <= length:
        raise ValueError(f"top-K of a sequence: expected 0 < k <= sequence length {length}, found k={k}")


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k positions (B, k) of the highest `scores` (B, L), best first.

    Tie rule: among equal scores the more recent position (higher index) comes first. The
    reference's `torch.topk` leaves tie order unspecified (and device dependent); ties are common
    (every pad scores -1.1), so we fix one. Each score becomes a unique int64 key, its float32 bits
    mapped to an integer of the same order, times L, plus the position: one `topk` over the keys
    (about 5x faster on CPU than a stable sort of the rows). -0.0 counts as 0.0, as in a sort.
    """
    length = scores.shape[-1]
    _check_k(k, length)
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes +0.0
    ordered = (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)  # int order = float order
    keys = torch.add(torch.arange(length, device=scores.device), ordered, alpha=length)  # int64
    return torch.topk(keys, k, dim=-1, largest=True, sorted=True).indices


def distinct_history_sim_soft_scores(
    target_item: torch.Tensor,
    target_category: torch.Tensor,
    history_items: torch.Tensor,
    history_categories: torch.Tensor,
    history_of_row: torch.Tensor,
) -> torch.Tensor:
    """`sim_soft_scores` (B, L) bit for bit, from the embeddings of the batch's U distinct histories
    (U, L, D) and each impression's history (B,): the keys are concatenated and normalised once per
    history, and each impression reads its history's (tests/model/test_kept_lookups.py)."""
    keys = unit(torch.cat([history_items, history_categories], dim=-1)).index_select(0, history_of_row)
    return scores_of(unit_cosines(torch.cat([target_item, target_category], dim=-1), keys))


def sim_hard_positions(
    sequence_categories: torch.Tensor, target_category: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sim_hard` GSU: the k most recent positions whose category equals the target's, newest first.

    Returns positions (B, k) long and valid (B, k) bool. Slots past the match count are invalid:
    the caller zeroes item, category and SCL key there. Those slots hold the most recent
    non-matching positions, newest first, exactly as the reference's stable argsort yields them.

    Categories are compared as given, like the reference compares raw IDs, so a target category
    0 (padding/OOV row) matches the 0s of the pads and of OOV categories. Pads matched this way
    carry item, category and SCL key 0 anyway, the same as a zeroed invalid slot. The one
    difference from the reference: an OOV target category also matches sequence items whose
    category is OOV, where the reference's raw IDs would (almost always) match nothing.
    """
    length = sequence_categories.shape[-1]
    _check_k(k, length)
    matches = sequence_categories == target_category.unsqueeze(-1)
    # Unique keys: every match above every non-match, newer above older within each group.
    keys = matches.long() * length + torch.arange(length, device=matches.device)
    positions = torch.topk(keys, k, dim=-1, largest=True, sorted=True).indices
    valid = torch.arange(k, device=matches.device) < matches.sum(dim=-1, keepdim=True)
    return positions, valid


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of `x` (B, L, ...) at `positions` (B, k): (B, k, ...). Differentiable in `x`."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2)))
    return torch.take_along_dim(x, index, dim=1)
