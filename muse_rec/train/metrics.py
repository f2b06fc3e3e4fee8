"""Evaluation metrics: exact AUC and GAUC over the whole evaluation set, and the reference's numbers.

The exact metrics credit a tied positive/negative pair 1/2 and group GAUC by user over every row of
every rank. The reference code (`utils/utils.py`: `calc_gauc_gpu`, `_confusion_matrix_at_thresholds`,
`calc_auroc_gpu`; accumulated in the trainer's `update_metric`) instead computes GAUC per batch and
rank (a user split across batches is several groups), credits ties 0, and takes AUC from 200 fixed
thresholds; `reference_batch_gauc` and `reference_threshold_auc` reproduce those so that runs can be
compared with the paper. Pair counts come from one sort and int64 block counts, never from pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from muse_rec.data.atomic import atomic_path

REFERENCE_THRESHOLDS = 200
"""The reference's `num_thresholds`."""
THRESHOLD_EPSILON = 1e-7
"""The reference's `kepsilon`: its end thresholds are -1e-7 and 1 + 1e-7, so 0 and 1 fall inside."""
RATE_EPSILON = 1e-6
"""The reference's `epsilon` in `calc_auroc_gpu`, added to the true positive rate's terms."""
PROBABILITY_EPSILON = 1e-7
"""The reference's `clip_prop(softmax + 1e-7)`: keeps log finite."""


def _sorted_keys(groups: np.ndarray | None, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (group, score) as uint64 keys `group rank << 33 | score key << 1 | label`, and
    the mask of rows that open a group.

    Sorting one key is faster and lighter than `np.lexsort` on (score, 64-bit user hash); the group
    rank (users in ascending ID order, below 2**31 groups) comes from one argsort of the IDs. Scores
    are compared as float32, the model's precision, through their order-preserving bits (-0.0
    counts as 0.0).
    """
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.uint32)
    score_keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31)).astype(np.uint64)
    positive = np.asarray(labels) > 0.5
    group_start = np.zeros(scores.size, dtype=bool)
    group_start[:1] = True
    if groups is None:
        keys = score_keys << 1 | positive
    else:
        order = np.argsort(groups)
        sorted_groups = groups[order]
        group_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
        group_rank = np.cumsum(group_start, dtype=np.uint64) - 1
        keys = group_rank << 33 | score_keys[order] << 1 | positive[order]
    keys.sort()  # each group keeps its rows' range, so `group_start` still holds
    return keys, group_start


def _pair_counts(
    groups: np.ndarray | None, scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group, in ascending group order: rows, positives, pairs won and pairs tied.

    A pair is (positive, negative) of one group; won = the positive scores strictly higher. Sorted
    by (group, score), the rows fall into blocks of equal (group, score): a positive wins against
    the negatives of its group's lower blocks and ties with those of its own block, so a cumulative
    sum of negatives over blocks gives every count exactly in int64, in O(n log n).
    `groups=None` puts every row in one group.
    """
    n = scores.size
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    keys, group_start = _sorted_keys(groups, scores, labels)
    block_start = group_start.copy()
    block_start[1:] |= (keys[1:] >> 1) != (keys[:-1] >> 1)
    blocks = np.flatnonzero(block_start)
    block_rows = np.diff(blocks, append=n)
    block_positives = np.add.reduceat(keys & 1, blocks).astype(np.int64)
    del keys  # 8 bytes a row, while the block arrays below may hold as many entries as rows
    block_negatives = block_rows - block_positives
    negatives_before = np.cumsum(block_negatives) - block_negatives
    opens_group = group_start[blocks]
    first_blocks = np.flatnonzero(opens_group)
    group_of_block = np.cumsum(opens_group) - 1
    negatives_below = negatives_before - negatives_before[first_blocks][group_of_block]
    return (
        np.add.reduceat(block_rows, first_blocks),
        np.add.reduceat(block_positives, first_blocks),
        np.add.reduceat(block_positives * negatives_below, first_blocks),
        np.add.reduceat(block_positives * block_negatives, first_blocks),
    )


def group_aucs(
    groups: np.ndarray | None, scores: np.ndarray, labels: np.ndarray, tie_credit: float
) -> tuple[np.ndarray, np.ndarray]:
    """AUC and row count of every group that has both a positive and a negative."""
    rows, positives, wins, ties = _pair_counts(groups, np.asarray(scores), np.asarray(labels))
    negatives = rows - positives
    kept = (positives > 0) & (negatives > 0)
    pairs = positives[kept] * negatives[kept]
    return (wins[kept] + tie_credit * ties[kept]) / pairs, rows[kept]


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC over all rows, a tie counting 1/2 (Mann-Whitney); NaN unless both classes occur."""
    aucs, _ = group_aucs(None, scores, labels, tie_credit=0.5)
    return float(aucs[0]) if aucs.size else math.nan


def exact_gauc(user_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """GAUC over all rows: each user's AUC (ties 1/2) weighted by the user's row count.

    Users with only positives or only negatives have no AUC and are skipped. Returns the GAUC (NaN
    when no user counts) and the number of users counted.
    """
    aucs, rows = group_aucs(np.asarray(user_ids), scores, labels, tie_credit=0.5)
    if not aucs.size:
        return math.nan, 0
    return float(np.dot(aucs, rows) / rows.sum()), int(aucs.size)


GAUC_BOOTSTRAP_DRAWS = 1000
"""Resamples of the users behind `gauc_bootstrap_se` (the SE itself is then known to about 2 %)."""
_BOOTSTRAP_CHUNK_INDICES = 1 << 22
"""Drawn user indices held at once (32 MB): resamples are drawn in chunks of this many indices."""


def gauc_bootstrap_se(
    user_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, draws: int = GAUC_BOOTSTRAP_DRAWS, seed: int = 0
) -> float:
    """Standard error of `exact_gauc` from the sampling of users: the spread of the GAUC over sets of
    users drawn with replacement (each user's AUC and row count fixed). NaN below two counted users.

    It says how far apart two GAUCs on the same evaluation set must be to mean anything; a paired
    comparison of two models is tighter, their errors being correlated. Deterministic (`seed`).
    """
    aucs, rows = group_aucs(np.asarray(user_ids), scores, labels, tie_credit=0.5)
    return _bootstrap_se(aucs, rows, draws, seed)


def _bootstrap_se(aucs: np.ndarray, rows: np.ndarray, draws: int = GAUC_BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """Bootstrap SE of sum(aucs * rows) / sum(rows) over the groups, drawn in chunks of bounded memory."""
    if aucs.size < 2 or draws < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    weighted = aucs * rows
    per_chunk = max(1, _BOOTSTRAP_CHUNK_INDICES // aucs.size)
    values = []
    for start in range(0, draws, per_chunk):
        picks = rng.integers(aucs.size, size=(min(per_chunk, draws - start), aucs.size))
        values.append(weighted[picks].sum(axis=1) / rows[picks].sum(axis=1))
    return float(np.concatenate(values).std(ddof=1))


@dataclass(frozen=True)
class EvalRows:
    """Every evaluated row of a run, as `train.save_eval_scores` writes them (`EvalAccumulator.compute`)."""

    user_ids: np.ndarray  # int64
    scores: np.ndarray  # float32
    labels: np.ndarray  # uint8

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, user_ids=self.user_ids, scores=self.scores, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> "EvalRows":
        with np.load(path) as saved:
            return cls(saved["user_ids"], saved["scores"], saved["labels"])


def paired_gauc_difference(a: EvalRows, b: EvalRows, draws: int = GAUC_BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """GAUC(a) - GAUC(b) of two models scored on the same rows, and its bootstrap SE: each resample
    draws the same users for both models, so the noise of the user sample, which both GAUCs share,
    cancels (the unpaired SE, from the two SEs, counts it twice). The difference of two GAUCs
    over the same users and row counts is the row-weighted mean of the per-user AUC differences.
    The rows may come in any order (another eval batch size or number of ranks), but each user must
    have the same labels in both."""
    def rows_by_user(run: EvalRows) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((run.labels, run.user_ids))
        return run.user_ids[order], run.labels[order]

    if not all(np.array_equal(x, y) for x, y in zip(rows_by_user(a), rows_by_user(b))):
        raise ValueError("paired GAUC: the two runs scored different rows (a user's labels differ): evaluate both on the same test split")
    aucs_a, rows = group_aucs(a.user_ids, a.scores, a.labels, tie_credit=0.5)
    aucs_b, _ = group_aucs(b.user_ids, b.scores, b.labels, tie_credit=0.5)
    differences = aucs_a - aucs_b
    return float(np.dot(differences, rows) / rows.sum()), _bootstrap_se(differences, rows, draws, seed)


def reference_batch_gauc(user_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """The reference's `calc_gauc_gpu` for one batch: (sum of AUC x rows, sum of rows) over its users.

    Groups are the users of this batch only and a tie counts 0 (the reference compares with `>`);
    single-class users are skipped. The reference's GAUC is the sum of the first numbers over all
    batches and ranks divided by the sum of the second ones.
    """
    aucs, rows = group_aucs(np.asarray(user_ids), scores, labels, tie_credit=0.0)
    return float(np.dot(aucs, rows)), int(rows.sum())


def reference_thresholds(count: int = REFERENCE_THRESHOLDS) -> np.ndarray:
    """The reference's thresholds, float32 like its tensor: -1e-7, i / (count - 1) for 0 < i < count - 1, 1 + 1e-7."""
    inner = np.arange(1, count - 1) / (count - 1)
    return np.concatenate([[-THRESHOLD_EPSILON], inner, [1.0 + THRESHOLD_EPSILON]]).astype(np.float32)


def reference_threshold_auc(scores: np.ndarray, labels: np.ndarray, thresholds: int = REFERENCE_THRESHOLDS) -> float:
    """The reference's AUC (`calc_auroc_gpu`, as `tf.compat.v1.metrics.auc`): ROC from fixed thresholds.

    At each threshold t of `reference_thresholds` a row is predicted positive when its float32
    score > t; with P positives and N negatives, TPR = (tp + 1e-6) / (P + 1e-6) and
    FPR = fp / (N + 1e-6); the AUC is the trapezoid sum over consecutive thresholds. Scores within
    one 1/(thresholds - 1) bin are not ordered, so it differs from (mostly lies below) the exact AUC.
    The formula is kept as is for one class (about 1 with no positive, 0 with no negative). Computed
    in float64 (the reference: float32, a difference of order 1e-7).
    """
    cuts = reference_thresholds(thresholds)
    positive = np.asarray(labels) > 0.5
    passed = np.searchsorted(cuts, np.asarray(scores, dtype=np.float32), side="left")  # thresholds < score

    def above(mask: np.ndarray) -> np.ndarray:
        """Rows of `mask` predicted positive at each threshold: those passing more than its index."""
        counts = np.bincount(passed[mask], minlength=thresholds + 1)
        return np.cumsum(counts[::-1])[::-1][1:]

    true_positives, false_positives = above(positive), above(~positive)
    tpr = (true_positives + RATE_EPSILON) / (positive.sum() + RATE_EPSILON)
    fpr = false_positives / ((~positive).sum() + RATE_EPSILON)
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))


def logloss(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of scores read as P(click), each class probability clipped like the
    reference's `clip_prop(p + 1e-7)`, so a confidently wrong row costs at most -log(1e-7)."""
    p = np.asarray(scores, dtype=np.float64)
    clicked = np.asarray(labels) > 0.5
    chosen = np.where(clicked, p, 1.0 - p)
    return float(-np.log(np.clip(chosen + PROBABILITY_EPSILON, 0.0, 1.0)).mean())


class EvalAccumulator:
    """One evaluation pass of one rank; `compute` gives every metric over all ranks.

    Keeps the user ID (int64), score (float32) and label (uint8) of every real row: 13 bytes a row,
    300 MB for 23 M rows. `compute` gathers every rank's rows onto every rank and sorts them there:
    about 70 bytes per row of the whole set at its peak (gathered columns, sort order, keys and
    per-tie-block counts), 1.6 GB and about 20 s of one CPU core for 23 M rows. The reference's
    per-batch GAUC depends on the batches, so `update` accumulates it as it goes.
    """

    def __init__(self) -> None:
        self._user_ids: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._reference_sum = 0.0
        self._reference_rows = 0

    def update(self, user_ids: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """Adds one batch (tensors of shape (B,) on any device).

        Weights are a mask, not sample weights: rows of weight 0 only pad a rank's last batch and
        are dropped, every other row counts once.
        """
        real = weights > 0
        user_ids = user_ids[real].detach().to("cpu", torch.int64).numpy()
        scores = scores[real].detach().to("cpu", torch.float32).numpy()
        labels = (labels[real] > 0.5).to("cpu", torch.uint8).numpy()
        batch_sum, batch_rows = reference_batch_gauc(user_ids, scores, labels)
        self._reference_sum += batch_sum
        self._reference_rows += batch_rows
        self._user_ids.append(user_ids)
        self._scores.append(scores)
        self._labels.append(labels)

    def compute(
        self, process_group: dist.ProcessGroup | None = None, bootstrap_draws: int = 0, save_to: Path | None = None
    ) -> dict[str, float | int]:
        """Every metric over the rows of all ranks (the same dict on each); a collective when distributed.

        Distributed when `process_group` is given or torch.distributed is initialised (then over
        its default group): every rank must call it. With `bootstrap_draws` > 0 the dict also holds
        `gauc_bootstrap_se`, the GAUC's bootstrap SE over that many resamples of the users. With
        `save_to` (give it on one rank) the gathered rows are written there (`EvalRows`).
        """
        columns = [
            np.concatenate(chunks) if chunks else np.zeros(0, dtype)
            for chunks, dtype in ((self._user_ids, np.int64), (self._scores, np.float32), (self._labels, np.uint8))
        ]
        reference = np.array([self._reference_sum, self._reference_rows], dtype=np.float64)
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            columns = _all_gather_rows(columns, process_group)
            reference = _all_reduce_sum(reference, process_group)
        user_ids, scores, labels = columns
        if save_to is not None:
            EvalRows(user_ids, scores, labels).save(save_to)
        aucs, rows = group_aucs(user_ids, scores, labels, tie_credit=0.5)  # exact_gauc's, kept for its SE
        reference_sum, reference_rows = reference
        se = {"gauc_bootstrap_se": _bootstrap_se(aucs, rows, bootstrap_draws)} if bootstrap_draws > 0 else {}
        return {
            "auc": exact_auc(scores, labels),
            "gauc": float(np.dot(aucs, rows) / rows.sum()) if aucs.size else math.nan,
            "gauc_users": int(aucs.size),
            **se,
            "reference_batch_gauc": float(reference_sum / reference_rows) if reference_rows else math.nan,
            "reference_auc": reference_threshold_auc(scores, labels) if labels.size else math.nan,
            "rows": int(labels.size),
            "click_rate": float(labels.mean()) if labels.size else math.nan,
            "logloss": logloss(scores, labels) if labels.size else math.nan,
        }


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL only moves CUDA tensors; gloo (and mixed backends) move CPU ones."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(columns: list[np.ndarray], group: dist.ProcessGroup | None) -> list[np.ndarray]:
    """Every rank's rows of `columns` (equal-length 1-D arrays), concatenated in rank order.

    `all_gather` needs one shape on every rank, so sizes go first and rows are padded to the largest.
    """
    device = _collective_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([columns[0].size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    padded_rows = max(max(counts), 1)
    gathered = []
    for column in columns:
        local = torch.zeros(padded_rows, dtype=torch.from_numpy(column).dtype, device=device)
        local[: column.size] = torch.from_numpy(column).to(device)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        gathered.append(torch.cat([part[:count] for part, count in zip(parts, counts)]).cpu().numpy())
    return gathered


def _all_reduce_sum(values: np.ndarray, group: dist.ProcessGroup | None) -> np.ndarray:
    """Element-wise sum of a small float64 array over the ranks."""
    tensor = torch.from_numpy(values).to(_collective_device(group))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.cpu().numpy()
