"""IdMap's bucketed remap against the plain searchsorted definition, on small and large maps."""
from __future__ import annotations

import numpy as np
import pytest

from muse_rec.data.feature_map import IdMap, first_unsorted_position, remap_reference


@pytest.mark.parametrize(
    "n,spread",
    [(0, "hashed"), (1, "hashed"), (7, "hashed"), (5000, "dense"), (300_000, "hashed"), (300_000, "dense"), (300_000, "clustered")],
)
def test_remap_equals_searchsorted_definition(n, spread):
    rng = np.random.default_rng(n)
    if spread == "hashed":  # the real data: hashed signed int64 IDs over the whole range
        keys = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    elif spread == "dense":  # small consecutive IDs (a custom data set)
        keys = np.arange(1, 3 * n + 1, 3, dtype=np.int64)
    else:  # most keys packed in a narrow range, a few far away: lopsided buckets
        keys = np.concatenate([rng.integers(10, 10_000_000, n - 3), [-(2**62), 2**61, 2**63 - 1]])
    keys = np.unique(keys)
    keys = keys[keys != 0]
    hits = keys[rng.integers(0, max(len(keys), 1), 50_000)] if len(keys) else np.empty(0, np.int64)
    probes = np.concatenate(
        [hits, rng.integers(-(2**63), 2**63 - 1, 20_000, dtype=np.int64), keys[:2] - 1, keys[-2:] + 1,
         [0, -(2**63), 2**63 - 1]]
    ).astype(np.int64)
    id_map = IdMap(keys)
    got = id_map.remap(probes.reshape(-1, 1))
    assert got.shape == (len(probes), 1)
    np.testing.assert_array_equal(got[:, 0], remap_reference(keys, probes))
    assert (got[: len(hits), 0] > 0).all() and id_map.num_rows == len(keys) + 1


def test_first_unsorted_position_finds_ties_and_inversions():
    assert first_unsorted_position(np.array([1, 2, 3])) is None
    assert first_unsorted_position(np.array([1, 2, 2, 3])) == 1
    assert first_unsorted_position(np.array([1, 5, 3])) == 1
    assert first_unsorted_position(np.array([], np.int64)) is None
