"""The GSU in the data pipeline (`model.gsu_stage: loader`): SCL cosines, top-K and category matches.

Vectorised over a batch; the plain tensor functions of `muse_rec.model.gsu` are their definition
and the tests hold the two equal (this package may not import the model's).

Cosines are read from the memory-mapped int8 SCL values file, never from a float copy of the
table, and computed once per distinct history: the impressions of a user share their history, so
each history's vectors are gathered once and multiplied with all of its targets. Products and
squared norms of int8 vectors are integers below 2**24 (128 x 127 x 127), exact in int32 and in
float32 whatever the summation order: the same vector pair always gives the same cosine, so ties
(an item seen twice, or two vectors with equal products and norms) stay exact ties and the tie
rule decides, on any CPU; `muse_rec.model.gsu.scl_cosines` (gsu_stage model) computes the same
numbers, dot / (|a| |b|) in float64 rounded once to float32.

Cost (per 1000 samples of 1000-long histories, one core): gathering the history rows from the
values file (random 128-byte reads, about 70 ns a row) and the top-K are most of it; the
products run as int8 matrix products (AVX512-VNNI) where the CPU has them.
"""
from __future__ import annotations

import numpy as np
import torch

NO_SCORE = -1.1
"""The reference's score of a cosine of exactly 0.0 (pads, items without SCL vector)."""

_INT8_PRODUCTS = bool(torch.cpu.get_capabilities().get("avx512_vnni", False)) and torch.backends.mkldnn.is_available()
"""`torch._int_mm` runs on oneDNN's VNNI kernels here; elsewhere it is a scalar loop, 50x slower
than a float32 matrix product, which is exact too (integer products below 2**24)."""


def scl_cosines(
    values: np.ndarray, target_rows: np.ndarray, history_rows: np.ndarray, history_of_row: np.ndarray, positions: np.ndarray | None = None
) -> np.ndarray:
    """float32 (B, W): cosine of each sample's target SCL vector with the vectors of its history.

    `values` int8 (N, 128) is the SCL values file (table row r is `values[r - 1]`, row 0 the zero
    vector); `target_rows` (B,) SCL rows of the targets; `history_rows` (U, W) SCL rows of the
    distinct histories; `history_of_row` (B,) the history of each sample, in runs (a history's
    samples are consecutive). A zero vector on either side gives 0, as `F.normalize` does.
    With `positions` (B, P), only the cosines there, (B, P): a history's vectors are then read
    only at the positions one of its samples keeps (sim_hard's matches and the recent window).
    """
    size = len(target_rows)
    new_run = np.diff(history_of_row, prepend=-1) != 0
    starts, run_of_row = np.flatnonzero(new_run), np.cumsum(new_run) - 1
    runs = history_rows[history_of_row[starts]]  # (R, W): the history of each run
    counts = np.full(len(starts), runs.shape[1])
    if positions is not None:  # each run's needed rows, moved to the left; positions index them
        cells = (run_of_row * runs.shape[1])[:, None] + positions  # into runs.ravel()
        needed = np.zeros(runs.size, bool)
        needed[cells] = True
        slots = np.cumsum(needed.reshape(runs.shape), axis=1) - 1
        kept = np.flatnonzero(needed)
        compact = np.zeros_like(runs)
        compact.ravel()[kept - kept % runs.shape[1] + slots.ravel()[kept]] = runs.ravel()[kept]
        runs, counts, positions = compact, slots[:, -1] + 1, torch.from_numpy(slots.ravel()[cells])
    targets = _gather(values, target_rows)
    dots = torch.empty((size, runs.shape[1] if positions is None else positions.shape[1]), dtype=torch.int32 if _INT8_PRODUCTS else torch.float32)
    squares = torch.zeros(runs.shape)  # squared norms of the vectors each run reads
    history = np.empty((runs.shape[1], values.shape[1]), np.int8)
    for run, (start, stop, count) in enumerate(zip(starts, np.append(starts[1:], size), counts)):
        vectors = _gather(values, runs[run, :count], out=history[:count])
        torch.sum(vectors.float().square_(), dim=-1, out=squares[run, :count])
        if positions is None:
            _products(targets[start:stop], vectors, out=dots[start:stop])
        else:
            dots[start:stop] = _products(targets[start:stop], vectors).gather(1, positions[start:stop])
    norms = _norms(squares, runs)
    run_of_row = torch.from_numpy(run_of_row)
    norms = norms.index_select(0, run_of_row) if positions is None else norms[run_of_row.unsqueeze(-1), positions]
    target_norms = _norms(targets.float().square_().sum(dim=-1), target_rows)
    cosines = torch.div(dots, norms.mul_(target_norms.unsqueeze(-1)), out=torch.empty(dots.shape))  # in float64, rounded once
    return cosines.add_(0.0).numpy()  # a zero vector: (+-dot) / inf = +-0.0 -> 0.0


def pairwise_cosines(values: np.ndarray, rows: np.ndarray, other_rows: np.ndarray) -> np.ndarray:
    """float64 (n, m): cosine of the SCL vector of each of `rows` (n,) with each of `other_rows` (m,),
    from exact integer products and squared norms divided once, so the same on any CPU (as
    `scl_cosines`'); row 0 and zero vectors give 0 (lemur's co-occurrence pairs)."""
    vectors, others = _gather(values, rows), _gather(values, other_rows)
    norms = _norms(vectors.float().square_().sum(dim=-1), rows)
    other_norms = _norms(others.float().square_().sum(dim=-1), other_rows)
    return (_products(vectors, others).double() / (norms.unsqueeze(-1) * other_norms)).add_(0.0).numpy()


def paired_cosines(values: np.ndarray, rows: np.ndarray, other_rows: np.ndarray) -> np.ndarray:
    """float64 (n, m): cosine of the SCL vector of each of `rows` (n,) with each of its own
    `other_rows` (n, m), exact as `pairwise_cosines`' (lemur's hard negatives, drawn per anchor)."""
    vectors = _gather(values, rows).float()
    others = _gather(values, other_rows.reshape(-1)).float().view(*other_rows.shape, values.shape[1])
    norms = _norms(vectors.square().sum(dim=-1), rows)
    other_norms = _norms(others.square().sum(dim=-1), other_rows)
    dots = torch.einsum("nd,nmd->nm", vectors, others).double()  # integers below 2**24: exact
    return (dots / (norms.unsqueeze(-1) * other_norms)).add_(0.0).numpy()


def _gather(values: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> torch.Tensor:
    """int8 vectors (n, 128) of SCL rows. Row 0 (pad, no vector) reads the first stored vector,
    which `_norms` cancels; mode="clip" skips numpy's bounds check (the rows are table rows)."""
    return torch.from_numpy(np.take(values, rows - 1, axis=0, out=out, mode="clip"))


def _norms(squares: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """float64 norms from exact squared norms: inf for row 0 and zero vectors, so that every
    cosine with them is dot / inf = 0 whatever was gathered."""
    norms = squares.double().sqrt_()
    return norms.masked_fill_(torch.from_numpy(rows == 0) | (squares == 0), float("inf"))


def _products(targets: torch.Tensor, vectors: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact integer dot products (n, m) of int8 targets (n, 128) and vectors (m, 128)."""
    if _INT8_PRODUCTS:
        return torch._int_mm(targets, vectors.T, out=out)
    return torch.mm(targets.float(), vectors.float().T, out=out)


_NO_SCORE_KEY = int(np.float32(NO_SCORE).view(np.int32) ^ 0x7FFFFFFF)
"""`NO_SCORE` as `top_k` orders scores (the int32 key of its float32 bits)."""


def top_k(cosines: np.ndarray, k: int) -> np.ndarray:
    """int64 (B, k): the positions of the k highest scores, best first, scores being the cosines
    with exactly 0.0 set to -1.1; among equal scores the newer (higher) position first."""
    scores = torch.from_numpy(cosines)
    bits = scores.view(torch.int32)
    ordered = (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)  # int order = float order
    return _top_unique(ordered.masked_fill_(scores == 0.0, _NO_SCORE_KEY), k)


def newest_matches(categories: np.ndarray, target_categories: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """sim_hard: (positions (B, k), valid (B, k) bool): the k newest positions whose category row
    equals the target's, newest first; slots past the match count hold the newest non-matching
    positions and are invalid."""
    matches = torch.from_numpy(categories == target_categories[:, None])
    positions = _top_unique(matches, k)
    valid = np.arange(k) < matches.sum(dim=-1, keepdim=True).numpy()
    return positions, valid


def _top_unique(primary: torch.Tensor, k: int) -> np.ndarray:
    """Positions of the k largest (primary, position) pairs per row: one topk over the unique keys
    primary * length + position, int32 for a bool primary (sim_hard's matches: topk runs twice as
    fast on them as on int64 keys), int64 for top_k's int32 score keys."""
    length = primary.shape[-1]
    if not 0 < k <= length:
        raise ValueError(f"top-K of a sequence: expected 0 < k <= sequence length {length}, found k={k}")
    keys = torch.add(torch.arange(length, dtype=torch.int32 if primary.dtype == torch.bool else torch.int64), primary, alpha=length)
    return torch.topk(keys, k, dim=-1, largest=True, sorted=True).indices.numpy()
