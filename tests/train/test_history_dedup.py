"""The fused (in-backward) sparse optimizers update the tables alike whether each distinct history
of a batch is looked up once or once per impression (`muse_rec.batch.per_impression_histories`):
TorchRec's fused backward sums a step's gradients per table row before the update, and the
distinct-history lookup hands it those sums (the index_select's backward) in fewer pieces. One
rank, DMP and TrainPipelineSparseDist as in training; equal up to the order of float sums, which
a third run measures as test_sharded_training does: the plain batches with their rows reversed."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from muse_rec.batch import batch_layout, per_impression_histories
from muse_rec.config import load_config
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.train.loop import Runtime, build_model
from muse_rec.train.pipeline import train_pipeline
from tests.gloo import gloo_group
from tests.train.test_sharded_training import assert_same_up_to_reduction_order, full_weights, reversed_rows

RUNS = {
    "muse": ["model.method=muse"],  # gsu_stage loader: the short sequence per history
    "sim_soft": ["model.method=sim_soft"],
    "sim_soft_sgd": ["model.method=sim_soft", "optim.sparse_cpu=sgd"],
    "muse_gsu_model": ["model.method=muse", "model.gsu_stage=model"],
}
STEPS = 3
LAYOUTS = {
    "distinct": lambda batch: batch,
    "plain": per_impression_histories,
    "plain_reversed": lambda batch: reversed_rows(per_impression_histories(batch)),
}


def run(rank: int, root: str, init_file: str, out: str) -> None:
    with gloo_group(init_file):
        results = {}
        for (name, overrides), layout in itertools.product(RUNS.items(), LAYOUTS):
            config = load_config(None, [f"data.root={root}", "data.batch_size=16", "model.keep_top=20", "optim.sparse_cpu_lr=0.05", *overrides])
            maps = FeatureMaps.load(DatasetLayout(root), "p90")
            sharded = build_model(config, maps, Runtime(0, 1, torch.device("cpu")))
            batches = map(LAYOUTS[layout], ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model)))
            initial = full_weights(sharded.model, 0)
            pipeline = train_pipeline(sharded.model, sharded.optimizer, torch.device("cpu"), config.model)
            losses = [pipeline.progress(batches)[0].detach().clone() for _ in range(STEPS)]
            pipeline.detach()
            results[name, layout] = {"losses": losses, "initial": initial, "weights": full_weights(sharded.model, 0)}
        torch.save(results, out)


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dedup")
    mp.spawn(run, args=(str(synthetic_root), str(tmp / "init"), str(tmp / "out.pt")), nprocs=1, join=True)
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("name", RUNS)
def test_fused_updates_of_distinct_histories_equal_the_plain_ones(trained, name):
    distinct, plain, reversed_plain = (trained[name, layout] for layout in LAYOUTS)
    assert torch.equal(distinct["losses"][0], plain["losses"][0])  # the same rows read, the same weights
    first = plain["losses"][0]
    for step, losses in enumerate(zip(plain["losses"], distinct["losses"], reversed_plain["losses"])):
        assert_same_up_to_reduction_order(f"loss at step {step}", *losses, losses[0] - first)
    moved = 0
    for key, expected in plain["weights"].items():
        update = expected - plain["initial"][key]
        assert_same_up_to_reduction_order(key, expected, distinct["weights"][key], reversed_plain["weights"][key], update)
        moved += "embeddings" in key and bool(update.abs().max() > 0)
    assert moved >= 2  # the item and category tables trained
