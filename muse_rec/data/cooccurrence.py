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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(anchor item rows, positive item rows, history index, anchor position u * L + j), each int64 (P,).

    `values` int8 (N, 128): the SCL values file (SCL row r is `values[r - 1]`, 0 = no vector);
    `scl_rows`, `item_rows` (U, L): the SCL and item-table rows of the U distinct histories.
    Per history: `min(per_history, candidates)` anchors drawn without replacement among the
    positions with an item and an SCL vector; each anchor's positive is the candidate of another
    item (a repeat of the anchor's item is not a pair) with the largest cosine, the oldest on ties,
    kept if that cosine is >= `min_cosine`."""
    anchors, positives, owners, places = [], [], [], []
    length = scl_rows.shape[1]
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
        places.append(u * length + candidates[drawn[kept]])
    if not anchors:
        return tuple(np.zeros(0, np.int64) for _ in range(4))
    return tuple(np.concatenate(parts).astype(np.int64) for parts in (anchors, positives, owners, places))


def same_category_negatives(
    values: np.ndarray,
    scl_rows: np.ndarray,
    item_rows: np.ndarray,
    cate_rows: np.ndarray,
    anchor_places: np.ndarray,
    count: int,
    max_cosine: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """int64 (P, count): hard negatives of each anchor, as positions u * L + j of the (U, L)
    histories; -1 where fewer were found. A negative is a position of another history whose item
    has an SCL vector, differs from the anchor's and lies in the anchor's category, with an SCL
    cosine below `max_cosine`: most likely another cluster of the same category (a sibling), which
    the batch's other pairs, seldom of the anchor's category, almost never offer. Drawn uniformly
    (4 x count tries) among such positions, each at most once."""
    out = np.full((len(anchor_places), count), -1, np.int64)
    if not len(anchor_places) or not count:
        return out
    items, cates, scl = item_rows.reshape(-1), cate_rows.reshape(-1), scl_rows.reshape(-1)
    owner = np.arange(items.size) // scl_rows.shape[1]
    eligible = np.flatnonzero((items != 0) & (scl != 0) & (cates != 0))
    eligible = eligible[np.argsort(cates[eligible], kind="stable")]
    sorted_cates = cates[eligible]
    anchor_cates = cates[anchor_places]
    low, high = np.searchsorted(sorted_cates, anchor_cates, "left"), np.searchsorted(sorted_cates, anchor_cates, "right")
    tries = low[:, None] + (rng.random((len(anchor_places), 4 * count)) * (high - low)[:, None]).astype(np.int64)
    places = eligible[np.minimum(tries, len(eligible) - 1)]
    ok = (high > low)[:, None] & (owner[places] != owner[anchor_places][:, None]) & (items[places] != items[anchor_places][:, None])
    ok &= gsu.paired_cosines(values, scl[anchor_places], scl[places]) < max_cosine
    order = np.argsort(places, axis=1, kind="stable")  # each position once: drop repeats of a draw
    ranked = np.take_along_axis(places, order, axis=1)
    repeat = np.zeros_like(ok)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    np.put_along_axis(ok, order, np.take_along_axis(ok, order, axis=1) & ~repeat, axis=1)
    first = np.argsort(~ok, axis=1, kind="stable")[:, :count]
    kept = np.take_along_axis(ok, first, axis=1)
    out[:] = np.where(kept, np.take_along_axis(places, first, axis=1), -1)
    return out
