"""Init of the trainable tables: a truncated normal (values beyond 2 std drawn again, none piled on
the bounds, as clipping would), the same values for the same seed."""
from __future__ import annotations

import math

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from muse_rec.distributed.table_weights import BLOCK_ROWS, TRUNCATE_AT, init_trainable_tables, truncated_normal

STD = 0.001


def truncated_std(bound: float) -> float:
    """Std of N(0, 1) restricted to [-bound, bound]."""
    return math.sqrt(1 - 2 * bound * _density(bound) / _mass(bound))


def _density(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _mass(bound: float) -> float:
    """P(|x| <= bound) for x ~ N(0, 1)."""
    return math.erf(bound / math.sqrt(2))


def test_truncated_normal_is_truncated_not_clipped():
    values = truncated_normal(np.random.default_rng(0), (BLOCK_ROWS, 16), STD).astype(np.float64) / STD
    assert np.abs(values).max() < TRUNCATE_AT  # clipping would put ~4.6% of the values exactly on it
    assert abs(values.mean()) < 2e-3
    assert abs(values.std() - truncated_std(TRUNCATE_AT)) < 3e-3  # 0.880: not 1, nor clipping's 0.960
    near_bound = np.mean(np.abs(values) > 1.8)  # 2.8% truncated; clipping leaves all of |x| > 1.8 there: 7.2%
    assert abs(near_bound - (_mass(TRUNCATE_AT) - _mass(1.8)) / _mass(TRUNCATE_AT)) < 2e-3


def test_init_fills_every_row_across_blocks_and_repeats_with_the_seed():
    rows = BLOCK_ROWS + 1000  # two blocks, the second partly used

    def initialised(seed: int) -> torch.Tensor:
        tables = EmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=rows, feature_names=["f"])])
        assert init_trainable_tables(tables, seed, STD) == ["embeddings.item.weight"]
        return tables.embeddings["item"].weight.detach().clone()

    first = initialised(1)
    assert torch.equal(first, initialised(1)) and not torch.equal(first, initialised(2))
    assert first.abs().max() < TRUNCATE_AT * STD and (first != 0).all()
    assert abs(float(first.double().std()) / STD - truncated_std(TRUNCATE_AT)) < 5e-3
