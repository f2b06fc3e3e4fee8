"""lemur's co-occurrence pairs (`muse_rec.data.cooccurrence`): by hand, against a loop over every
candidate, and as the loader carries them (valid rows of the pair's own history, the same pairs
whatever the workers and on resume)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from muse_rec.batch import batch_layout
from muse_rec.config import load_config
from muse_rec.data.cooccurrence import cooccurring_pairs, same_category_negatives
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset

VALUES = np.array([[3, 4, 0], [4, 3, 0], [-3, -4, 0], [0, 0, 5], [3, 4, 1]], np.int8)
"""SCL rows 1..5 (row r is VALUES[r - 1])."""


def test_pairs_by_hand_skip_repeats_missing_vectors_and_far_items():
    # items 11, 12, 13, 11 (a repeat), 14 (no SCL vector), 15, pad
    scl = np.array([[1, 2, 3, 1, 0, 5, 0]])
    items = np.array([[11, 12, 13, 11, 14, 15, 0]])
    anchors, positives, history, places = cooccurring_pairs(VALUES, scl, items, 10, 0.9, np.random.default_rng(0))
    found = dict(zip(anchors.tolist(), positives.tolist()))
    # cosines: 11-15 0.98, 11-12 0.96, 12-15 0.94; 13 is opposite to 11, 14 has no vector
    assert found[11] == 15 and found[15] == 11  # not 11's own repeat at position 3
    assert found[12] == 11  # cos(12, 11) = 0.96 > cos(12, 15) = 0.94
    assert 13 not in found and 14 not in found  # 13's best cosine is negative; 14 has no vector
    assert set(history.tolist()) == {0}
    assert len(anchors) == anchors.size == 4  # positions 0, 1, 3 (11 again) and 5 are drawn
    assert all(items.reshape(-1)[p] == a for p, a in zip(places, anchors))  # where each anchor stands


def test_pairs_equal_a_loop_over_every_candidate():
    rng = np.random.default_rng(1)
    values = rng.integers(-127, 128, (40, 16), dtype=np.int8)
    scl = rng.integers(0, 41, (5, 30))
    items = np.where(rng.random((5, 30)) < 0.1, 0, rng.integers(1, 25, (5, 30)))
    scl[4, 2:] = 0  # a history with fewer than two candidates gives no pair
    got = cooccurring_pairs(values, scl, items, 8, 0.1, np.random.default_rng(7))[:3]
    draws, want = np.random.default_rng(7), ([], [], [])
    for u in range(5):
        candidates = [i for i in range(30) if scl[u, i] and items[u, i]]
        if len(candidates) < 2:
            continue
        for d in draws.choice(len(candidates), size=min(8, len(candidates)), replace=False):
            a = candidates[d]
            best, best_cos = None, -math.inf
            for j in candidates:
                if items[u, j] == items[u, a]:
                    continue
                x, y = values[scl[u, a] - 1].astype(float), values[scl[u, j] - 1].astype(float)
                c = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
                if c > best_cos + 1e-6:  # strictly larger: the oldest wins ties
                    best, best_cos = j, c
            if best is not None and best_cos >= 0.1:
                for column, value in zip(want, (items[u, a], items[u, best], u)):
                    column.append(value)
    assert len(want[0]) > 10
    for column, expected in zip(got, want):
        assert column.tolist() == expected


def test_hard_negatives_are_far_items_of_the_anchors_category_in_other_histories():
    rng = np.random.default_rng(3)
    values = rng.integers(-127, 128, (60, 16), dtype=np.int8)
    scl = rng.integers(0, 61, (6, 40))
    items = np.where(rng.random((6, 40)) < 0.1, 0, rng.integers(1, 50, (6, 40)))
    cates = rng.integers(0, 4, (6, 40))  # few categories: many candidates
    anchors = np.flatnonzero((scl.reshape(-1) != 0) & (items.reshape(-1) != 0) & (cates.reshape(-1) != 0))[::7]
    negatives = same_category_negatives(values, scl, items, cates, anchors, 5, 0.2, np.random.default_rng(0))
    assert negatives.shape == (len(anchors), 5) and (negatives >= 0).sum() > 2 * len(anchors)
    flat = lambda a: a.reshape(-1)  # noqa: E731
    for anchor, row in zip(anchors, negatives):
        found = row[row >= 0]
        assert list(row[: len(found)]) == list(found)  # found ones first, then -1
        assert len(set(found)) == len(found)  # each position once
        for place in found:
            assert place // 40 != anchor // 40 and flat(cates)[place] == flat(cates)[anchor] != 0
            assert flat(items)[place] not in (0, flat(items)[anchor]) and flat(scl)[place] != 0
            x, y = values[flat(scl)[anchor] - 1].astype(float), values[flat(scl)[place] - 1].astype(float)
            assert x @ y / np.linalg.norm(x) / np.linalg.norm(y) < 0.2
    assert (same_category_negatives(values, scl, items, cates, anchors, 0, 0.2, np.random.default_rng(0))).shape == (len(anchors), 0)


@pytest.fixture(scope="module")
def lemur_config(synthetic_root):
    return load_config(None, [f"data.root={synthetic_root}", "data.batch_size=40", "model.method=lemur",
                              "model.lemur.cooccurrence_weight=1", "model.lemur.cooccurrence_pairs=6", "model.lemur.cooccurrence_min_cosine=0.3"])


def batches(config, num_workers=0, start_step=0):
    maps = FeatureMaps.load(DatasetLayout(config.data.root), "p90")
    data = config.data.__class__(**{**config.data.__dict__, "num_workers": num_workers})
    dataset = ShardDataset(data, "train", 0, 1, maps, start_step=start_step, layout=batch_layout(config.model))
    if not num_workers:
        return list(dataset)
    from muse_rec.data.loader import make_dataloader
    return list(make_dataloader(dataset))


def test_loader_pairs_are_items_of_their_own_history_and_follow_the_batch_alone(lemur_config):
    plain = batches(lemur_config)
    assert sum(len(b.cooccurrence) for b in plain) > 0
    for batch in plain:
        histories = batch.sequence_features["150_2_180"].values().view(batch.num_histories, -1)
        for anchor, positive, history, *_ in batch.cooccurrence.tolist():
            row = histories[history].tolist()
            assert anchor in row and positive in row and anchor != positive != 0
    def by_batch(found):  # workers change the order of the batches (`batch_order`), not their content
        return {tuple(b.user_ids.tolist()) + tuple(b.labels.tolist()): b.cooccurrence.tolist() for b in found}

    for other in (batches(lemur_config, num_workers=2), [*plain[:2], *batches(lemur_config, start_step=2)]):
        assert by_batch(other) == by_batch(plain)


def test_no_pairs_unless_a_trained_encoder_uses_them(lemur_config):
    off = load_config(None, [f"data.root={lemur_config.data.root}", "data.batch_size=40", "model.method=lemur"])
    frozen = load_config(None, [f"data.root={lemur_config.data.root}", "data.batch_size=40", "model.method=lemur",
                                "model.lemur.cooccurrence_weight=1", "model.lemur.train_encoder=false"])
    for config in (off, frozen):
        assert batch_layout(config.model).cooccurrence_pairs == 0
        assert batches(config)[0].cooccurrence.shape == (0, 3)


def test_loader_hard_negatives_are_positions_of_other_histories_of_the_anchors_category(lemur_config):
    config = load_config(None, [f"data.root={lemur_config.data.root}", "data.batch_size=40", "model.method=lemur",
                                "model.lemur.cooccurrence_weight=1", "model.lemur.cooccurrence_pairs=6",
                                "model.lemur.cooccurrence_min_cosine=0.3", "model.lemur.cooccurrence_negatives=3",
                                "model.lemur.cooccurrence_negative_max_cosine=0.5"])
    found = 0
    for batch in batches(config):
        assert batch.cooccurrence.shape[1] == 3 + 3
        items = batch.sequence_features["150_2_180"].values()
        cates = batch.sequence_features["151_2_180"].values()
        length = items.numel() // batch.num_histories
        for anchor, _, history, *negatives in batch.cooccurrence.tolist():
            row = items.view(batch.num_histories, -1)[history].tolist()
            anchor_cate = cates.view(batch.num_histories, -1)[history][row.index(anchor)]
            for place in (n for n in negatives if n >= 0):
                found += 1
                assert place // length != history and cates[place] == anchor_cate and items[place] not in (0, anchor)
    assert found > 0
