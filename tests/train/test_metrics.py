"""Metrics against brute-force pair loops, the reference's own formulas, and a real 2-rank gloo run."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from muse_rec.train import metrics
from muse_rec.train.metrics import (
    GAUC_BOOTSTRAP_DRAWS,
    EvalAccumulator,
    EvalRows,
    gauc_bootstrap_se,
    paired_gauc_difference,
    exact_auc,
    exact_gauc,
    reference_batch_gauc,
    reference_threshold_auc,
    reference_thresholds,
)
from tests.gloo import gloo_group


def brute_auc(scores: list[float], labels: list[float], tie_credit: float = 0.5) -> float:
    """Mean credit over all (positive, negative) pairs: 1 if ordered right, `tie_credit` if tied."""
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    if not positives or not negatives:
        return math.nan
    credit = sum(1.0 if p > n else tie_credit if p == n else 0.0 for p in positives for n in negatives)
    return credit / (len(positives) * len(negatives))


def brute_gauc(user_ids, scores, labels, tie_credit: float = 0.5) -> tuple[float, int]:
    """Per-user `brute_auc` weighted by the user's rows, single-class users skipped."""
    rows = defaultdict(list)
    for user, score, label in zip(user_ids, scores, labels):
        rows[user].append((score, label))
    weighted, weight, users = 0.0, 0, 0
    for pairs in rows.values():
        auc = brute_auc([s for s, _ in pairs], [y for _, y in pairs], tie_credit)
        if not math.isnan(auc):
            weighted, weight, users = weighted + auc * len(pairs), weight + len(pairs), users + 1
    return (weighted / weight if weight else math.nan), users


def transcribed_threshold_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The reference's `_confusion_matrix_at_thresholds` + `calc_auroc_gpu`, one (rows x thresholds) matrix."""
    thresholds = torch.tensor(
        [0.0 - 1e-7] + [(i + 1) * 1.0 / 199 for i in range(198)] + [1.0 + 1e-7], dtype=torch.float64
    ).float()
    prop = torch.from_numpy(scores).float()
    positive = torch.from_numpy(labels).bool()
    predicted = (prop.unsqueeze(-1) > thresholds).t()
    tp = (predicted & positive).sum(1).double()
    fp = (predicted & ~positive).sum(1).double()
    fn = (~predicted & positive).sum(1).double()
    tn = (~predicted & ~positive).sum(1).double()
    rec = (tp + 1e-6) / (tp + fn + 1e-6)
    fpr = fp / (fp + tn + 1e-6)
    return float(((fpr[:-1] - fpr[1:]) * (rec[:-1] + rec[1:]) / 2.0).sum())


def random_rows(seed: int, rows: int, users: int, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User IDs, scores on a coarse grid (many ties) and labels."""
    rng = np.random.default_rng(seed)
    user_ids = rng.integers(0, users, rows) * 1_000_003  # sparse raw IDs
    scores = (rng.integers(0, levels, rows) / levels).astype(np.float32)
    labels = (rng.random(rows) < 0.3).astype(np.float32)
    return user_ids, scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_auc_matches_pair_count(seed: int) -> None:
    _, scores, labels = random_rows(seed, rows=400, users=1, levels=7)
    assert exact_auc(scores, labels) == pytest.approx(brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_exact_auc_is_nan_with_one_class() -> None:
    assert math.isnan(exact_auc(np.array([0.1, 0.7], np.float32), np.array([1.0, 1.0], np.float32)))
    assert math.isnan(exact_auc(np.zeros(0, np.float32), np.zeros(0, np.float32)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_gauc_matches_per_user_pair_count(seed: int) -> None:
    # 120 users over 600 rows: users of one row, single-class users and many ties all occur.
    user_ids, scores, labels = random_rows(seed, rows=600, users=120, levels=5)
    gauc, users = exact_gauc(user_ids, scores, labels)
    expected, expected_users = brute_gauc(user_ids.tolist(), scores.tolist(), labels.tolist())
    assert users == expected_users
    assert 0 < users < 120
    assert gauc == pytest.approx(expected, abs=1e-12)


def test_exact_gauc_without_two_class_users() -> None:
    gauc, users = exact_gauc(np.array([1, 2]), np.array([0.3, 0.4], np.float32), np.array([1.0, 0.0], np.float32))
    assert math.isnan(gauc) and users == 0


def test_reference_batch_gauc_ties_and_split_users() -> None:
    # User 7: a tie between a positive and a negative (reference 0, exact 1/2). User 8 is split across
    # the two batches: AUC 0 in the first, 1 in the second, 1/2 over both. User 9 only clicks.
    first = (np.array([7, 7, 7, 8, 8, 9]), np.array([0.9, 0.5, 0.9, 0.2, 0.8, 0.4]), np.array([1, 0, 0, 1, 0, 1]))
    second = (np.array([8, 8]), np.array([0.6, 0.1]), np.array([1, 0]))
    assert reference_batch_gauc(*first) == pytest.approx((3 * 0.5 + 2 * 0.0, 5))
    assert reference_batch_gauc(*second) == pytest.approx((2 * 1.0, 2))
    reference = (1.5 + 2.0) / (5 + 2)
    exact, users = exact_gauc(*(np.concatenate(pair) for pair in zip(first, second)))
    assert users == 2
    assert exact == pytest.approx((3 * 0.75 + 4 * 0.5) / 7)
    assert reference == pytest.approx(0.5) and exact != pytest.approx(reference)


def test_reference_batch_gauc_matches_brute_force_with_zero_tie_credit() -> None:
    user_ids, scores, labels = random_rows(3, rows=300, users=40, levels=4)
    weighted, rows = reference_batch_gauc(user_ids, scores, labels)
    per_user = defaultdict(list)
    for user, score, label in zip(user_ids.tolist(), scores.tolist(), labels.tolist()):
        per_user[user].append((score, label))
    aucs = [(brute_auc([s for s, _ in r], [y for _, y in r], tie_credit=0.0), len(r)) for r in per_user.values()]
    kept = [(auc, n) for auc, n in aucs if not math.isnan(auc)]
    assert rows == sum(n for _, n in kept)
    assert weighted == pytest.approx(sum(auc * n for auc, n in kept), abs=1e-9)


def test_reference_thresholds() -> None:
    cuts = reference_thresholds()
    assert cuts.dtype == np.float32 and cuts.size == 200
    assert cuts[0] < 0 < cuts[1] and cuts[-2] < 1 < cuts[-1]
    assert cuts[1:-1] == pytest.approx(np.arange(1, 199) / 199)


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_threshold_auc_matches_transcription(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Scores exactly on thresholds, at 0 and 1, and anywhere.
    on_cuts = reference_thresholds()[rng.integers(1, 199, 100)]
    scores = np.concatenate([on_cuts, [0.0, 1.0, 0.0, 1.0], rng.random(300)]).astype(np.float32)
    labels = (rng.random(scores.size) < 0.4).astype(np.float32)
    expected = transcribed_threshold_auc(scores, labels)
    assert reference_threshold_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_reference_threshold_auc_is_exact_auc_when_bins_separate_scores() -> None:
    rng = np.random.default_rng(5)
    scores = ((rng.integers(0, 199, 500) + 0.5) / 199).astype(np.float32)  # bin centres: ties only within bins
    labels = (rng.random(500) < 0.5).astype(np.float32)
    assert reference_threshold_auc(scores, labels) == pytest.approx(exact_auc(scores, labels), abs=1e-5)


WORLD = 2


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Six batches of (user_ids, scores, labels, weights); the last two (one per rank) end in padding.

    Eight users over all batches, so every user is split across batches and ranks. Padding rows carry
    labels and scores (and a user of their own) that would change every metric if they were counted.
    """
    rng = np.random.default_rng(11)
    batches = []
    for index in range(6):
        user_ids = torch.from_numpy(rng.integers(0, 8, 30))
        scores = torch.from_numpy(rng.integers(0, 6, 30) / 6).float()
        labels = torch.from_numpy(rng.random(30) < 0.35).float()
        weights = torch.ones(30)
        if index >= 4:
            weights[-7:] = 0.0
            user_ids[-7:] = 99
            scores[-7:] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5])
            labels[-7:] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
        batches.append((user_ids, scores, labels, weights))
    return batches


def accumulate(batches) -> EvalAccumulator:
    accumulator = EvalAccumulator()
    for batch in batches:
        accumulator.update(*batch)
    return accumulator


def distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: its share of the batches (round robin), then the collective `compute`."""
    with gloo_group(init_file, rank, WORLD):
        result = accumulate(make_batches()[rank::WORLD]).compute(bootstrap_draws=200)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def assert_same_metrics(actual: dict, expected: dict) -> None:
    """Exact metrics do not depend on row order: equal. Float sums in another order: to rounding."""
    assert actual.keys() == expected.keys()
    for key in ("auc", "gauc", "gauc_users", "gauc_bootstrap_se", "reference_auc", "rows", "click_rate"):
        assert actual[key] == expected[key], key
    for key in ("reference_batch_gauc", "logloss"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-12), key


def test_accumulator_matches_functions_on_real_rows() -> None:
    batches = make_batches()
    result = accumulate(batches).compute(bootstrap_draws=GAUC_BOOTSTRAP_DRAWS)
    real = [tuple(column[batch[3] > 0].numpy() for column in batch[:3]) for batch in batches]
    user_ids, scores, labels = (np.concatenate(column) for column in zip(*real))
    assert result["rows"] == labels.size == 6 * 30 - 2 * 7
    assert result["auc"] == exact_auc(scores, labels)
    assert (result["gauc"], result["gauc_users"]) == exact_gauc(user_ids, scores, labels)
    assert result["gauc_users"] == 8
    assert result["gauc_bootstrap_se"] == gauc_bootstrap_se(user_ids, scores, labels) > 0
    assert "gauc_bootstrap_se" not in accumulate(batches).compute()  # not asked for: not computed
    assert result["reference_auc"] == reference_threshold_auc(scores, labels)
    assert result["click_rate"] == pytest.approx(labels.mean())
    per_batch = [reference_batch_gauc(*batch) for batch in real]
    expected = sum(s for s, _ in per_batch) / sum(n for _, n in per_batch)
    assert result["reference_batch_gauc"] == pytest.approx(expected, rel=1e-12)
    expected_logloss = -np.mean(np.log(np.clip(np.where(labels > 0.5, scores, 1.0 - scores) + 1e-7, 0.0, 1.0)))
    assert result["logloss"] == pytest.approx(expected_logloss, rel=1e-6)
    padded_scores, padded_labels = (np.concatenate([batch[i].numpy() for batch in batches]) for i in (1, 2))
    assert exact_auc(padded_scores, padded_labels) != result["auc"]  # the padding would have mattered


def test_accumulator_across_two_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(distributed_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    expected = accumulate(make_batches()).compute(bootstrap_draws=200)
    for rank in range(WORLD):
        assert_same_metrics(json.loads((tmp_path / f"rank{rank}.json").read_text()), expected)


def test_accumulator_without_rows() -> None:
    result = EvalAccumulator().compute(bootstrap_draws=GAUC_BOOTSTRAP_DRAWS)
    assert result["rows"] == 0 and result["gauc_users"] == 0
    undefined = ("auc", "gauc", "gauc_bootstrap_se", "reference_batch_gauc", "reference_auc", "click_rate", "logloss")
    assert all(math.isnan(result[key]) for key in undefined)


def test_gauc_bootstrap_se_is_the_spread_of_the_gauc_over_resampled_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a direct bootstrap: every user's rows resampled together, the GAUC recomputed each time."""
    rng = np.random.default_rng(5)
    users = np.repeat(np.arange(300), 12)
    labels = (rng.random(users.size) < 0.3).astype(np.uint8)
    scores = (labels * 0.4 + rng.random(users.size)).astype(np.float32)
    se = gauc_bootstrap_se(users, scores, labels)
    direct = []
    for _ in range(300):
        picked = rng.integers(300, size=300)
        rows = (picked[:, None] * 12 + np.arange(12)).reshape(-1)
        direct.append(exact_gauc(np.repeat(np.arange(300), 12), scores[rows], labels[rows])[0])
    assert se == pytest.approx(np.std(direct, ddof=1), rel=0.15)
    assert se == gauc_bootstrap_se(users, scores, labels)  # seeded
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK_INDICES", 1000)  # 3 resamples a chunk
    assert gauc_bootstrap_se(users, scores, labels) == pytest.approx(se, rel=0.1)
    assert math.isnan(gauc_bootstrap_se(users[:12], scores[:12], labels[:12]))  # one user: no spread


def test_paired_gauc_difference_is_the_gauc_difference_with_the_spread_of_a_joint_resample(tmp_path: Path) -> None:
    """Against a direct bootstrap that resamples users once for both models; a saved and reloaded
    `EvalRows` gives the same; other rows are refused."""
    rng = np.random.default_rng(6)
    users = np.repeat(np.arange(300), 12)
    labels = (rng.random(users.size) < 0.3).astype(np.uint8)
    shared = labels * 0.4 + rng.random(users.size)  # what both models see: their errors correlate
    a = EvalRows(users, (shared + 0.3 * rng.random(users.size)).astype(np.float32), labels)
    b = EvalRows(users, (shared + 0.3 * rng.random(users.size)).astype(np.float32), labels)
    a.save(tmp_path / "a.npz")
    difference, se = paired_gauc_difference(EvalRows.load(tmp_path / "a.npz"), b)
    assert difference == pytest.approx(exact_gauc(users, a.scores, labels)[0] - exact_gauc(users, b.scores, labels)[0], abs=1e-12)
    direct = []
    for _ in range(300):
        picked = rng.integers(300, size=300)
        rows = (picked[:, None] * 12 + np.arange(12)).reshape(-1)
        resampled = [exact_gauc(np.repeat(np.arange(300), 12), m.scores[rows], labels[rows])[0] for m in (a, b)]
        direct.append(resampled[0] - resampled[1])
    assert se == pytest.approx(np.std(direct, ddof=1), rel=0.15)
    unpaired = math.hypot(gauc_bootstrap_se(users, a.scores, labels), gauc_bootstrap_se(users, b.scores, labels))
    assert se < 0.8 * unpaired  # the shared noise cancels
    assert paired_gauc_difference(a, a) == (0.0, 0.0)
    shuffled = rng.permutation(users.size)  # another eval batch size or world size: another row order
    assert paired_gauc_difference(a, EvalRows(users[shuffled], b.scores[shuffled], labels[shuffled])) == (difference, se)
    with pytest.raises(ValueError, match="different rows"):
        paired_gauc_difference(a, EvalRows(users, b.scores, np.roll(labels, 1)))
