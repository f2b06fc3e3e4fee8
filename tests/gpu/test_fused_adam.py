"""On CUDA (skipped elsewhere): training with fused (in-backward) Adam on one GPU, NCCL, TorchRec's
CUDA kernels and the pipeline `muse-rec train` uses, steps only the table rows the loss reads.
Adam moves a row it sees even at a zero gradient once the row has momentum, so each step's
moved rows must be among that step's rows read with gradient: for muse the batch's sequence
features (the loader's GSU chose them); for sim_soft the targets and the kept and last cells of
its second lookup, while the history rows it only scored stay put, including rows with
momentum from an earlier step (the test counts them, so that it can fail). On CPU, where the
sparse optimizers are SGD and row-wise Adagrad (a zero gradient moves nothing), the lookups
themselves are checked instead (tests/model/test_kept_lookups.py)."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from muse_rec import schema
from muse_rec.batch import batch_layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fused Adam)")

STEPS = 6


def item_table(model) -> torch.Tensor:
    (weight,) = [v for k, v in model.state_dict().items() if k.endswith("sequence_tables.embeddings.item.weight")]
    return weight.local_shards()[0].tensor.detach().clone() if hasattr(weight, "local_shards") else weight.detach().clone()


def run(rank: int, root: str, method: str, out: str) -> None:
    from muse_rec.config import load_config
    from muse_rec.data.feature_map import FeatureMaps
    from muse_rec.data.layout import DatasetLayout
    from muse_rec.data.loader import ShardDataset
    from muse_rec.distributed.sharding import dense_module
    from muse_rec.train.loop import build_model, init_distributed, shutdown_distributed
    from muse_rec.train.pipeline import train_pipeline

    runtime = init_distributed()
    config = load_config(None, [f"data.root={root}", "data.batch_size=16", "model.keep_top=8", f"model.method={method}", "optim.sparse_lr=0.01"])
    maps = FeatureMaps.load(DatasetLayout(root), "p90")
    sharded = build_model(config, maps, runtime)
    read_with_gradient: list[torch.Tensor] = []
    inner = dense_module(sharded.model)
    if method == "sim_soft":  # the second lookup, with gradient: its KJT's item rows
        inner.sequence_tables.register_forward_hook(
            lambda _, args, __: read_with_gradient.append(torch.cat([args[0][k].values() for k in (schema.TARGET_ITEM, schema.HIST_ITEMS)])) if torch.is_grad_enabled() else None
        )
    trained_batches = []

    def batches():
        for batch in ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model)):
            trained_batches.append(batch)
            yield batch

    pipeline = train_pipeline(sharded.model, sharded.optimizer, runtime.device, config.model)
    source = batches()
    steps = []
    before = item_table(sharded.model)
    for step in range(STEPS):
        pipeline.progress(source)
        after = item_table(sharded.model)
        moved = ((after != before).any(dim=-1)).nonzero().flatten().cpu()
        batch = trained_batches[step]
        if method == "sim_soft":
            read = read_with_gradient[step].cpu()
            history = batch.sequence_features[schema.HIST_ITEMS].values()
        else:
            read = torch.cat([batch.sequence_features[k].values() for k in batch.sequence_features.keys() if k in (schema.TARGET_ITEM, schema.TOP_ITEMS, schema.SHORT_ITEMS)])
            history = read
        steps.append({"moved": moved, "read": read.unique(), "history": history.unique()})
        before = after
    pipeline.detach()
    torch.save(steps, out)
    shutdown_distributed()


@pytest.mark.parametrize("method", ["muse", "sim_soft"])
def test_fused_adam_steps_only_the_rows_the_loss_reads(synthetic_root, tmp_path, method):
    out = tmp_path / "out.pt"
    mp.spawn(run, args=(str(synthetic_root), method, str(out)), nprocs=1, join=True)
    steps = torch.load(out, weights_only=False)
    assert all(len(s["moved"]) for s in steps)  # the optimizer steps the table
    scored_with_momentum = 0
    for step, s in enumerate(steps):
        moved, read = set(s["moved"].tolist()), set(s["read"].tolist())
        assert moved <= read | {0}, f"step {step}: rows {sorted(moved - read)[:10]} moved without being read with gradient"
        earlier = set().union(*(set(t["read"].tolist()) for t in steps[:step])) - {0}
        scored_with_momentum += len((set(s["history"].tolist()) - read) & earlier)
    if method == "sim_soft":
        assert scored_with_momentum > 0  # rows only scored this step, with momentum from an earlier one: what Adam would move
