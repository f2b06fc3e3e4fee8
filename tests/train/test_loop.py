"""The training loop's samples/s counts real samples: not the weight-0 rows that pad a rank's last
batch so that all ranks step together."""
from __future__ import annotations

import dataclasses

import pytest

from muse_rec.config import DataConfig
from muse_rec.data.loader import ShardDataset, make_dataloader
from muse_rec.train.loop import real_rows_per_step

WORLD = 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_real_rows_per_step_are_the_loaders_weighted_rows(synthetic_root, num_workers):
    config = dataclasses.replace(DataConfig(), root=str(synthetic_root), batch_size=50, long_seq_len=8, num_workers=num_workers)
    datasets = [ShardDataset(config, "train", rank, WORLD) for rank in range(WORLD)]
    per_rank = [[int((batch.weights > 0).sum()) for batch in make_dataloader(d)] for d in datasets]
    loaded = [sum(step) for step in zip(*per_rank)]
    assert real_rows_per_step(datasets[0], WORLD) == loaded
    assert sum(loaded) == datasets[0].plan.total_rows
    assert (loaded[-1] < WORLD * config.batch_size) == (num_workers == 0)  # 2 workers: the short, padded batch comes earlier
