"""2-rank sharded training (gloo, DMP, fused sparse optimizers, the pipeline `muse-rec train` uses) ends with
the same weights and losses as 1-rank training on the same rows, for every method; every trained
weight moved, the SCL table did not. Adagrad and AdamW hardly see a gradient's scale, so a run
with SGD on the tables and the first step's dense gradients check the mean over ranks itself.

"The same" allows for reduction order, which differs between the layouts and between CPUs
(AVX2, AVX-512, AMX kernels sum in other orders). The test measures that noise itself: a third
run trains on one rank with every batch's rows reversed, which changes nothing but the order of
the sums. Each compared tensor may then differ between 1 and 2 ranks by `NOISE_FACTOR` times its
own reversed-rows difference plus `UPDATE_SHARE` of what training changed in it. The second term
covers what the reversed rows cannot reproduce: the layouts multiply matrices of other shapes (8
rows a rank against 16 on one rank), which vectorised kernels block and sum in other orders, and
AdamW and Adagrad divide each gradient element by its own running scale, so where a gradient is
mostly cancellation (an attention query's) that noise moves the update by a share of its size. On
an AVX-512 machine 2 ranks differed from 1 by up to 0.37 % of a tensor's update (a first-step
gradient: 0.2 %), 450 times that tensor's reversed-rows difference. The bugs these tests guard
against (a sum instead of a mean over ranks, a rank's gradient dropped) change a tensor by the
order of its whole update, far above that bound: with rank 1's rows weighted 0 (its gradient
dropped), 239 of the 243 trained tensors of the seven runs differed by more than 1 % of their
update (median 59 %), besides the losses.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_rec.batch import HISTORY_FEATURES, Batch, batch_layout, per_impression_cells
from muse_rec.config import load_config
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.train.loop import Runtime, build_model
from muse_rec.train.pipeline import train_pipeline
from tests.gloo import gloo_group

METHODS = ("muse", "sim_soft", "sim_hard", "din")
RUNS = {method: [f"model.method={method}"] for method in METHODS} | {
    "muse_gsu_model": ["model.method=muse", "model.gsu_stage=model"],
    "muse_int8_replicated": ["model.method=muse", "model.gsu_stage=model", "model.scl_storage=int8_replicated"],
    "muse_sgd": ["model.method=muse", "optim.sparse_cpu=sgd"],
}
STEPS = 4
BATCH_SIZE = 8
"""Rows per rank and step: 2 ranks, or 1 rank reading both ranks' batches side by side."""
NOISE_FACTOR = 10.0
"""How far above the measured reduction-order noise (the reversed-rows run) a difference may lie."""
UPDATE_SHARE = 1e-2
"""This share of a tensor's update: the noise of other matrix shapes, which reversed rows keep (see above)."""
ROUNDING = 2 * BATCH_SIZE * torch.finfo(torch.float32).eps
"""And the rounding of a sum of a step's rows, relative to the value itself (the loss at step 0)."""
SCL_KEY = "scl_table.embeddings.scl.weight"
UNUSED_BY = {"din": ("dense.long_attention.", "dense.simtier_long.")}
"""Weights no gradient reaches, by key prefix: din turns the long branch off (its weights exist)."""


def concat_batches(a: Batch, b: Batch) -> Batch:
    """The two batches side by side (a's rows, then b's) as one valid batch: b's distinct histories
    follow a's (its `history_of_row` offset by a's count) and the rows holding them come first;
    kept cells per impression (`per_impression_cells`)."""
    a, b = per_impression_cells(a), per_impression_cells(b)

    def cat(x: JaggedTensor, y: JaggedTensor, history: bool) -> JaggedTensor:
        lengths = torch.cat([x.lengths(), y.lengths()])
        if history:  # a's U_a rows of L, its empty rows, b's U_b rows of L, ...: the L's first again
            lengths = lengths.sort(descending=True, stable=True).values
        return JaggedTensor(values=torch.cat([x.values(), y.values()]), lengths=lengths)

    def cat_kjt(x: KeyedJaggedTensor, y: KeyedJaggedTensor) -> KeyedJaggedTensor:
        dx, dy = x.to_dict(), y.to_dict()
        return KeyedJaggedTensor.from_jt_dict({k: cat(dx[k], dy[k], k in HISTORY_FEATURES) for k in x.keys()})

    both = _per_field(lambda x, y: cat_kjt(x, y) if isinstance(x, KeyedJaggedTensor) else torch.cat([x, y]) if isinstance(x, torch.Tensor) else x + y, a, b)
    return dataclasses.replace(both, history_of_row=torch.cat([a.history_of_row, b.history_of_row + a.num_histories]))


def reversed_rows(batch: Batch) -> Batch:
    """The same samples in reverse order, and their distinct histories too; kept cells per impression."""
    batch = per_impression_cells(batch)
    histories = batch.num_histories

    def flip(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return KeyedJaggedTensor.from_jt_dict({
            k: JaggedTensor(values=j.values().view(histories, -1).flip(0).reshape(-1), lengths=j.lengths()) if k in HISTORY_FEATURES
            else JaggedTensor(values=j.values().view(batch.batch_size, -1).flip(0).reshape(-1), lengths=j.lengths().flip(0))
            for k, j in kjt.to_dict().items()
        })

    flipped = _per_field(lambda x: flip(x) if isinstance(x, KeyedJaggedTensor) else x.flip(0) if isinstance(x, torch.Tensor) else x, batch)
    return dataclasses.replace(flipped, history_of_row=histories - 1 - flipped.history_of_row)


def _per_field(combine, *batches: Batch) -> Batch:
    """A batch whose every field is `combine` of the batches' fields (a field None in all stays None,
    `top_cells` empty: the batches hold their cells per impression)."""
    values = {}
    for field in dataclasses.fields(Batch):
        parts = [getattr(b, field.name) for b in batches]
        values[field.name] = None if parts[0] is None else {} if field.name == "top_cells" else combine(*parts)
    return Batch(**values)


def test_concatenated_and_reversed_batches_keep_every_impression(synthetic_root):
    """The 1-rank runs below read valid batches: every impression keeps its features, histories included."""
    config = load_config(None, [f"data.root={synthetic_root}", f"data.batch_size={BATCH_SIZE}", "model.gsu_stage=model"])
    maps = FeatureMaps.load(DatasetLayout(synthetic_root), "p90")
    a, b = (next(iter(ShardDataset(config.data, "train", r, 2, maps, layout=batch_layout(config.model)))) for r in range(2))
    both, back = concat_batches(a, b), reversed_rows(a)
    assert both.num_histories == a.num_histories + b.num_histories < 2 * BATCH_SIZE
    keys = [*a.id_features.keys(), *a.sequence_features.keys(), *a.scl_features.keys()]
    for key in keys:
        assert torch.equal(both.sequence(key), torch.cat([a.sequence(key), b.sequence(key)])), key
        assert torch.equal(back.sequence(key), a.sequence(key).flip(0)), key


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


def run(rank: int, world_size: int, root: str, init_file: str, out: str, reverse: bool) -> None:
    with gloo_group(init_file, rank, world_size):
        results = {}
        for run_name, overrides in RUNS.items():
            config = load_config(
                None, [f"data.root={root}", f"data.batch_size={BATCH_SIZE}", "model.keep_top=20", "optim.sparse_cpu_lr=0.05", *overrides]
            )
            maps = FeatureMaps.load(DatasetLayout(root), "p90")
            sharded = build_model(config, maps, Runtime(rank, world_size, torch.device("cpu")))
            halves = [iter(ShardDataset(config.data, "train", r, 2, maps, layout=batch_layout(config.model))) for r in range(2)]
            if world_size == 2:
                batches = halves[rank]
            else:  # one rank reads both halves, each step the two ranks' batches side by side
                batches = (concat_batches(a, b) for a, b in zip(*halves))
                if reverse:
                    batches = map(reversed_rows, batches)
            initial = full_weights(sharded.model, rank)
            pipeline = train_pipeline(sharded.model, sharded.optimizer, torch.device("cpu"), config.model)
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


def train_in_processes(world_size: int, root: Path, tmp: Path, reverse: bool = False) -> dict:
    name = f"world{world_size}{'-reversed' if reverse else ''}"
    out = tmp / f"{name}.pt"
    mp.spawn(run, args=(world_size, str(root), str(tmp / f"init-{name}"), str(out), reverse), nprocs=world_size, join=True)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory) -> tuple[dict, dict, dict]:
    """(1 rank, 2 ranks, 1 rank with every batch's rows reversed) for every run."""
    tmp = tmp_path_factory.mktemp("sharded")
    return tuple(
        train_in_processes(world_size, synthetic_root, tmp, reverse) for world_size, reverse in ((1, False), (2, False), (1, True))
    )


def assert_same_up_to_reduction_order(key: str, one: torch.Tensor, two: torch.Tensor, reversed_one: torch.Tensor, update: torch.Tensor) -> None:
    """`two` equals `one` within `NOISE_FACTOR` x the reversed-rows noise, plus `UPDATE_SHARE` x `update`
    and `ROUNDING` x `one` (norms)."""
    noise = (reversed_one - one).norm().item()
    bound = NOISE_FACTOR * noise + UPDATE_SHARE * update.norm().item() + ROUNDING * one.norm().item()
    difference = (two - one).norm().item()
    assert difference <= bound, (
        f"{key}: |2 ranks - 1 rank| = {difference:.3g} exceeds {bound:.3g} "
        f"({NOISE_FACTOR:g} x reversed-rows noise {noise:.3g} + {UPDATE_SHARE:g} x update {update.norm().item():.3g} "
        f"+ rounding)"
    )


@pytest.mark.parametrize("method", RUNS)
def test_two_ranks_equal_one_rank(trained, method):
    one, two, reversed_one = (result[method] for result in trained)
    first = one["losses"][0]
    for step, (a, b, r) in enumerate(zip(one["losses"], two["losses"], reversed_one["losses"])):
        assert_same_up_to_reduction_order(f"loss at step {step}", *map(torch.tensor, (a, b, r, a - first)))
    assert one["weights"].keys() == two["weights"].keys()
    for key, expected in one["weights"].items():
        update = expected - one["initial"][key]
        assert_same_up_to_reduction_order(key, expected, two["weights"][key], reversed_one["weights"][key], update)


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
    one, two, reversed_one = (result["muse_sgd"] for result in trained)
    tables = [k for k in one["weights"] if (".embedding_bags." in k or ".embeddings." in k) and not k.endswith(SCL_KEY)]
    assert len(tables) == 10
    for key in tables:
        step_one, step_two, step_reversed = (run["weights"][key] - run["initial"][key] for run in (one, two, reversed_one))
        assert step_one.abs().max() > 0, key
        assert_same_up_to_reduction_order(key, step_one, step_two, step_reversed, step_one)


@pytest.mark.parametrize("method", ["muse", "din"])
def test_dense_gradients_are_the_mean_over_ranks(trained, method):
    one, two, reversed_one = (result[method]["first_gradients"] for result in trained)
    assert one.keys() == two.keys() and len(one) > 10 and all(k.startswith("dense.") for k in one)
    for key, expected in one.items():
        assert_same_up_to_reduction_order(key, expected, two[key], reversed_one[key], expected)


def test_gsu_in_the_loader_trains_like_the_gsu_in_the_model(trained):
    """Both stages compute the same exact SCL cosines, so they keep the same positions; what differs
    is the order of float sums over the looked-up rows, bounded as between 1 and 2 ranks."""
    loader, model = trained[1]["muse"], trained[1]["muse_gsu_model"]
    noise = [trained[0]["muse"], trained[2]["muse"]]  # 1 rank, and 1 rank with rows reversed
    first = loader["losses"][0]
    for step, (a, b, *r) in enumerate(zip(loader["losses"], model["losses"], *(n["losses"] for n in noise))):
        assert_same_up_to_reduction_order(f"loss at step {step}", *map(torch.tensor, (a, b, r[1] - r[0] + a, a - first)))
    for key, value in loader["weights"].items():
        reversed_noise = noise[1]["weights"][key] - noise[0]["weights"][key]
        update = value - loader["initial"][key]
        assert_same_up_to_reduction_order(key, value, model["weights"][key], value + reversed_noise, update)


def test_replicated_int8_scl_table_trains_exactly_like_the_sharded_fp16_one(trained):
    fp16, int8 = trained[1]["muse_gsu_model"], trained[1]["muse_int8_replicated"]
    assert int8["losses"] == fp16["losses"]
    assert not [k for k in int8["weights"] if "scl_table" in k]  # the int8 values are data, not state
    for key, value in int8["weights"].items():
        torch.testing.assert_close(value, fp16["weights"][key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
