"""Init of the trainable tables: the reference's `trunc_normal_(std, a=-2, b=2)`, whose bounds are
absolute (at std 0.001, a plain normal: not one cut at 2 std), the same values for the same seed."""
from __future__ import annotations

import math

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from muse_rec.distributed.table_weights import BLOCK_ROWS, TRUNCATE_BOUND, init_trainable_tables, truncated_normal

STD = 0.001


def truncated_std(bound: float) -> float:
    """Std of N(0, 1) restricted to [-bound, bound]."""
    return math.sqrt(1 - 2 * bound * _density(bound) / _mass(bound))


def _density(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _mass(bound: float) -> float:
    """P(|x| <= bound) for x ~ N(0, 1)."""
    return math.erf(bound / math.sqrt(2))


def test_default_std_gives_a_plain_normal():
    values = truncated_normal(np.random.default_rng(0), (BLOCK_ROWS, 16), STD).astype(np.float64) / STD
    assert abs(values.mean()) < 2e-3
    assert abs(values.std() - 1) < 3e-3  # a cut at 2 std would give 0.880
    beyond_2_std = np.mean(np.abs(values) > 2)  # 4.55% of a normal, none after a cut at 2 std
    assert abs(beyond_2_std - (1 - _mass(2))) < 1e-3
    assert np.abs(values).max() * STD <= TRUNCATE_BOUND


def test_bounds_are_absolute_and_truncate_not_clip():
    std = 1.5
    bound = TRUNCATE_BOUND / std  # 1.33 std: 18% of the draws fall outside
    values = truncated_normal(np.random.default_rng(1), (BLOCK_ROWS, 4), std).astype(np.float64) / std
    assert np.abs(values).max() <= bound
    near_bound = np.mean(np.abs(values) > 0.99 * bound)  # 0.5%; clipping would pile the 18% there
    assert abs(near_bound - (_mass(bound) - _mass(0.99 * bound)) / _mass(bound)) < 1e-3
    assert abs(values.std() - truncated_std(bound)) < 3e-3


def test_init_fills_every_row_across_blocks_and_repeats_with_the_seed():
    rows = BLOCK_ROWS + 1000  # two blocks, the second partly used

    def initialised(seed: int) -> torch.Tensor:
        tables = EmbeddingCollection([EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=rows, feature_names=["f"])])
        assert init_trainable_tables(tables, seed, STD) == ["embeddings.item.weight"]
        return tables.embeddings["item"].weight.detach().clone()

    first = initialised(1)
    assert torch.equal(first, initialised(1)) and not torch.equal(first, initialised(2))
    assert (first != 0).all()
    assert abs(float(first.double().std()) / STD - 1) < 5e-3  # not 0.880
