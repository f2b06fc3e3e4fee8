"""2-rank sharded training (gloo, DMP, fused sparse optimizers, TrainPipelineSparseDist) ends with
the same weights and losses as 1-rank training on the same rows, for every method; every trained
weight moved, the SCL table did not. Adagrad and AdamW hardly see a gradient's scale, so a run
with SGD on the tables and the first step's dense gradients check the mean over ranks itself."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from muse_rec.batch import Batch, batch_layout
from muse_rec.config import load_config
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.train.loop import Runtime, build_model

METHODS = ("muse", "sim_soft", "sim_hard", "din")
RUNS = {method: [f"model.method={method}"] for method in METHODS} | {
    "muse_gsu_model": ["model.method=muse", "model.gsu_stage=model"],
    "muse_int8_replicated": ["model.method=muse", "model.gsu_stage=model", "model.scl_storage=int8_replicated"],
    "muse_sgd": ["model.method=muse", "optim.sparse_cpu=sgd"],
}
STEPS = 4
SCL_KEY = "scl_table.embeddings.scl.weight"
UNUSED_BY = {"din": ("dense.long_attention.", "dense.simtier_long.")}
"""Weights no gradient reaches, by key prefix: din turns the long branch off (its weights exist)."""


def concat_kjt(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Stack two batches' KJTs along the batch (per key: a's rows, then b's)."""
    da, db = a.to_dict(), b.to_dict()
    return KeyedJaggedTensor.from_jt_dict({k: _cat_jagged(da[k], db[k]) for k in a.keys()})


def _cat_jagged(x, y):
    from torchrec.sparse.jagged_tensor import JaggedTensor

    return JaggedTensor(values=torch.cat([x.values(), y.values()]), lengths=torch.cat([x.lengths(), y.lengths()]))


def concat_batches(a: Batch, b: Batch) -> Batch:
    return Batch(
        id_features=concat_kjt(a.id_features, b.id_features),
        sequence_features=concat_kjt(a.sequence_features, b.sequence_features),
        scl_features=None if a.scl_features is None else concat_kjt(a.scl_features, b.scl_features),
        labels=torch.cat([a.labels, b.labels]),
        weights=torch.cat([a.weights, b.weights]),
        user_ids=torch.cat([a.user_ids, b.user_ids]),
        top_cosines=torch.cat([a.top_cosines, b.top_cosines]),
        short_cosines=torch.cat([a.short_cosines, b.short_cosines]),
    )


def full_weights(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Every parameter as one full tensor on rank 0 (sharded tables gathered)."""
    out = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            out[key] = full
        else:
            out[key] = value.detach().clone()
    return out


def run(rank: int, world_size: int, root: str, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = {}
    for run_name, overrides in RUNS.items():
        config = load_config(
            None, [f"data.root={root}", "data.batch_size=8", "model.keep_top=20", "optim.sparse_cpu_lr=0.05", *overrides]
        )
        maps = FeatureMaps.load(DatasetLayout(root), "p90")
        sharded = build_model(config, maps, Runtime(rank, world_size, torch.device("cpu")))
        halves = [iter(ShardDataset(config.data, "train", r, 2, maps, layout=batch_layout(config.model))) for r in range(2)]
        if world_size == 2:
            batches = halves[rank]
        else:  # one rank reads both halves, each step the two ranks' batches side by side
            batches = (concat_batches(a, b) for a, b in zip(*halves))
        initial = full_weights(sharded.model, rank)
        pipeline = TrainPipelineSparseDist(sharded.model, sharded.optimizer, torch.device("cpu"))
        losses, first_gradients = [], {}
        for step in range(STEPS):
            loss = pipeline.progress(batches)[0].detach().clone()
            if step == 0:  # DDP's gradients of the dense parameters, before any weight differs
                first_gradients = {k: p.grad.clone() for k, p in sharded.model.named_parameters() if p.grad is not None}
            dist.all_reduce(loss)
            losses.append(float(loss) / world_size)
        pipeline.detach()
        results[run_name] = {
            "losses": losses, "initial": initial, "weights": full_weights(sharded.model, rank), "first_gradients": first_gradients,
        }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def train_in_processes(world_size: int, root: Path, tmp: Path) -> dict:
    out = tmp / f"world{world_size}.pt"
    mp.spawn(run, args=(world_size, str(root), str(tmp / f"init{world_size}"), str(out)), nprocs=world_size, join=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("sharded")
    return train_in_processes(1, synthetic_root, tmp), train_in_processes(2, synthetic_root, tmp)


@pytest.mark.parametrize("method", RUNS)
def test_two_ranks_equal_one_rank(trained, method):
    one, two = trained[0][method], trained[1][method]
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    assert one["weights"].keys() == two["weights"].keys()
    for key, expected in one["weights"].items():
        torch.testing.assert_close(two["weights"][key], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("method", RUNS)
def test_training_moved_every_trained_weight_and_kept_scl_frozen(trained, method):
    result = trained[1][method]
    unchanged = sorted(k for k, before in result["initial"].items() if torch.equal(result["weights"][k], before))
    expected = sorted(k for k in result["initial"] if k.endswith(SCL_KEY) or k.startswith(UNUSED_BY.get(method, ())))
    assert unchanged == expected


def test_scl_table_holds_the_values_file_after_training(trained, synthetic_root):
    from muse_rec.data.feature_map import SclIndex

    layout = DatasetLayout(synthetic_root)
    scl = SclIndex(layout.scl_keys_path, layout.scl_values_path)
    assert not [k for method in METHODS for k in trained[1][method]["weights"] if "scl_table" in k]  # gsu_stage loader
    for method in ("muse_gsu_model",):
        weights = trained[1][method]["weights"]
        (scl_key,) = [k for k in weights if k.endswith(SCL_KEY)]
        table = weights[scl_key].float()
        assert torch.equal(table[0], torch.zeros(128))
        assert torch.equal(table[1:], torch.from_numpy(scl.values.astype("float32")))


def test_sgd_table_updates_are_the_mean_over_ranks(trained):
    """SGD's update is lr x gradient: a sum over ranks instead of the mean would double it."""
    one, two = trained[0]["muse_sgd"], trained[1]["muse_sgd"]
    tables = [k for k in one["weights"] if (".embedding_bags." in k or ".embeddings." in k) and not k.endswith(SCL_KEY)]
    assert len(tables) == 10
    for key in tables:
        step_one, step_two = one["weights"][key] - one["initial"][key], two["weights"][key] - two["initial"][key]
        assert step_one.abs().max() > 0, key
        torch.testing.assert_close(step_two, step_one, rtol=1e-3, atol=1e-9, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("method", ["muse", "din"])
def test_dense_gradients_are_the_mean_over_ranks(trained, method):
    one, two = trained[0][method]["first_gradients"], trained[1][method]["first_gradients"]
    assert one.keys() == two.keys() and len(one) > 10 and all(k.startswith("dense.") for k in one)
    for key, expected in one.items():
        torch.testing.assert_close(two[key], expected, rtol=1e-4, atol=1e-8, msg=lambda m: f"{key}: {m}")


def test_gsu_in_the_loader_trains_like_the_gsu_in_the_model(trained):
    """Both stages compute the same exact SCL cosines, so they keep the same positions; the loss
    differs only by the order of float sums over looked-up rows (Adagrad-scale steps)."""
    loader, model = trained[1]["muse"], trained[1]["muse_gsu_model"]
    assert loader["losses"] == pytest.approx(model["losses"], rel=1e-5)
    for key, value in loader["weights"].items():
        torch.testing.assert_close(value, model["weights"][key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_replicated_int8_scl_table_trains_exactly_like_the_sharded_fp16_one(trained):
    fp16, int8 = trained[1]["muse_gsu_model"], trained[1]["muse_int8_replicated"]
    assert int8["losses"] == fp16["losses"]
    assert not [k for k in int8["weights"] if "scl_table" in k]  # the int8 values are data, not state
    for key, value in int8["weights"].items():
        torch.testing.assert_close(value, fp16["weights"][key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
