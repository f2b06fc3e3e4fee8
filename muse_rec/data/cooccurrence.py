"""Co-occurrence pairs for lemur's content encoder, drawn in the data pipeline.

A user's history is where the data says which items belong together: most of a long history
comes from a few interests. The bank's reads of the history carry no gradient, so without a
loss on history items the encoder learns from clicked targets alone. Here each distinct history
of a batch gives up to `per_history` pairs: an anchor position drawn at random (among positions
whose item has an SCL vector), paired with the other item of the same history whose frozen SCL
vector is closest to the anchor's, if that cosine reaches `min_cosine`. Both inputs are frozen or
raw, so this runs once per distinct history in the loader, not in the step. An SCL vector that
points to the wrong cluster still finds the anchor's true cluster-mates in its own history (a
user's history holds its interests' items, not their siblings'), so the pairs are right more
often than the SCL vectors are.

Cosines come from the memory-mapped int8 values file and are exact, as the GSU's
(`muse_rec.data.gsu.pairwise_cosines`): the same pairs on any CPU.
"""
from __future__ import annotations

import numpy as np

from muse_rec.data import gsu


def cooccurring_pairs(
    values: np.ndarray,
    scl_rows: np.ndarray,
    item_rows: np.ndarray,
    per_history: int,
    min_cosine: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchor item rows, positive item rows, history index), each int64 (P,).

    `values` int8 (N, 128): the SCL values file (SCL row r is `values[r - 1]`, 0 = no vector);
    `scl_rows`, `item_rows` (U, L): the SCL and item-table rows of the U distinct histories.
    Per history: `min(per_history, candidates)` anchors drawn without replacement among the
    positions with an item and an SCL vector; each anchor's positive is the candidate of another
    item (a repeat of the anchor's item is not a pair) with the largest cosine, the oldest on ties,
    kept if that cosine is >= `min_cosine`."""
    anchors, positives, owners = [], [], []
    for u in range(len(scl_rows)):
        candidates = np.flatnonzero((scl_rows[u] != 0) & (item_rows[u] != 0))
        if len(candidates) < 2:
            continue
        drawn = rng.choice(len(candidates), size=min(per_history, len(candidates)), replace=False)
        cosines = gsu.pairwise_cosines(values, scl_rows[u, candidates[drawn]], scl_rows[u, candidates])
        items = item_rows[u, candidates]
        cosines[items[drawn][:, None] == items[None, :]] = -np.inf
        best = cosines.argmax(axis=1)
        kept = cosines[np.arange(len(drawn)), best] >= min_cosine
        anchors.append(items[drawn[kept]])
        positives.append(items[best[kept]])
        owners.append(np.full(int(kept.sum()), u, np.int64))
    if not anchors:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(anchors).astype(np.int64), np.concatenate(positives).astype(np.int64), np.concatenate(owners)
