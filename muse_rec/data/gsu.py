"""The GSU in the data pipeline (`model.gsu_stage: loader`): SCL cosines, top-K and category matches.

Vectorised over a batch; the plain tensor functions of `muse_rec.model.gsu` are their definition
and the tests hold the two equal (this package may not import the model's).

Cosines are read from the memory-mapped int8 SCL values file, never from a float copy of the
table, and computed once per distinct history: the impressions of a user share their history, so
each history's vectors are gathered and converted once and multiplied with all of its targets.
Products and squared norms of int8 vectors are integers below 2**24 (128 x 127 x 127), which
float32 holds exactly whatever the summation order: the same vector pair always gives the same
cosine, so ties (an item seen twice, or two vectors with equal products and norms) stay exact
ties and the tie rule decides, on any BLAS; `muse_rec.model.gsu.scl_cosines` (gsu_stage model)
computes the same numbers.
"""
from __future__ import annotations

import numpy as np
import torch

NO_SCORE = -1.1
"""The reference's score of a cosine of exactly 0.0 (pads, items without SCL vector)."""


def scl_cosines(values: np.ndarray, target_rows: np.ndarray, history_rows: np.ndarray, history_of_row: np.ndarray) -> np.ndarray:
    """float32 (B, W): cosine of each sample's target SCL vector with the vectors of its history.

    `values` int8 (N, 128) is the SCL values file (table row r is `values[r - 1]`, row 0 the zero
    vector); `target_rows` (B,) SCL rows of the targets; `history_rows` (U, W) SCL rows of the
    distinct histories; `history_of_row` (B,) the history of each sample, in runs (a history's
    samples are consecutive). A zero vector on either side gives 0, as `F.normalize` does.
    """
    out = np.zeros((len(target_rows), history_rows.shape[1]), np.float32)
    if not len(target_rows):
        return out
    targets, target_norms = _vectors(values, target_rows)
    starts = np.flatnonzero(np.diff(history_of_row, prepend=-1))
    for start, stop in zip(starts, np.append(starts[1:], len(target_rows))):
        history, history_norms = _vectors(values, history_rows[history_of_row[start]])
        dots = (targets[start:stop] @ history.T).double()  # exact integers
        norms = target_norms[start:stop, None] * history_norms[None, :]
        out[start:stop] = torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0).float().numpy()
    return out


def _vectors(values: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 vectors (n, 128) of SCL rows (row 0: zeros) and their float64 norms."""
    vectors = torch.from_numpy(np.take(values, np.maximum(rows - 1, 0), axis=0)).float()
    vectors *= torch.from_numpy(rows > 0).unsqueeze(-1)
    return vectors, (vectors * vectors).sum(dim=-1).double().sqrt()


def top_k(cosines: np.ndarray, k: int) -> np.ndarray:
    """int64 (B, k): the positions of the k highest scores, best first, scores being the cosines
    with exactly 0.0 set to -1.1; among equal scores the newer (higher) position first."""
    scores = torch.from_numpy(cosines)
    scores = scores.masked_fill(scores == 0.0, NO_SCORE)
    bits = scores.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order = float order
    return _top_unique(ordered.long(), k)


def newest_matches(categories: np.ndarray, target_categories: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """sim_hard: (positions (B, k), valid (B, k) bool): the k newest positions whose category row
    equals the target's, newest first; slots past the match count hold the newest non-matching
    positions and are invalid."""
    matches = torch.from_numpy(categories == target_categories[:, None])
    positions = _top_unique(matches.long(), k)
    valid = np.arange(k) < matches.sum(dim=-1, keepdim=True).numpy()
    return positions, valid


def _top_unique(primary: torch.Tensor, k: int) -> np.ndarray:
    """Positions of the k largest (primary, position) pairs per row: one topk over unique keys."""
    length = primary.shape[-1]
    if not 0 < k <= length:
        raise ValueError(f"top-K of a sequence: expected 0 < k <= sequence length {length}, found k={k}")
    keys = primary * length + torch.arange(length)
    return torch.topk(keys, k, dim=-1, largest=True, sorted=True).indices.numpy()
