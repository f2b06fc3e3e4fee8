"""Offline sharding plans per hardware profile: made without a GPU or process group, within the
profile's caps, saved and loaded exactly, refused on other hardware, and used by a real 2-rank run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from muse_rec.cli import main
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from muse_rec.batch import batch_layout
from muse_rec.config import Config, HardwareConfig, load_config
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.distributed.planning import (
    PROFILES_DIR,
    TAOBAO_MM_ITEM_ROWS,
    TAOBAO_MM_ROWS,
    load_config_with_profile,
    load_plan,
    plan_offline,
    save_plan,
    table_rows,
    topology_from_profile,
)
from muse_rec.distributed.sharding import table_constraints
from muse_rec.distributed.topology import GIB, running_hardware
from muse_rec.errors import ConfigError, MuseRecError
from muse_rec.model.muse import MuseModel
from muse_rec.train.loop import Runtime, build_model
from tests.gloo import gloo_group

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
GB = 10**9


def profiled(tmp_path: Path, profile: str, *overrides: str) -> Config:
    """A job on `profile` whose data directory has no feature maps: released TAOBAO-MM sizes."""
    return load_config_with_profile(None, profile, [f"data.root={tmp_path / 'no-data'}", *overrides])


def test_every_profile_names_its_hardware():
    assert set(PROFILES) >= {"cpu-2core", "h100x1", "h100x8", "a100-40gbx8", "rtx4090x8", "h100x8x2nodes"}
    for profile in PROFILES:
        hardware = load_config_with_profile(None, profile).hardware
        topology = topology_from_profile(hardware)
        assert (topology.compute_device, topology.world_size) == (hardware.device_type, hardware.world_size)
        assert topology.local_world_size == hardware.local_world_size
        assert topology.devices[0].storage.ddr == int(hardware.ddr_cap_gib * GIB)
        if hardware.device_type == "cuda":
            assert topology.devices[0].storage.hbm == int(hardware.hbm_cap_gib * GIB)
            assert topology.hbm_mem_bw == hardware.hbm_bw_gb_s * 1e6  # bytes per ms


def test_cpu_2core_profile_is_half_the_host_per_rank():
    hardware = load_config_with_profile(None, "cpu-2core").hardware
    assert (hardware.device_type, hardware.world_size, hardware.local_world_size) == ("cpu", 2, 2)
    assert hardware.ddr_cap_gib * 2 < 24


@pytest.mark.parametrize(
    "profile,vocab,budget",
    [
        ("rtx4090x8", "full", None),  # fits 8 x 24 GB
        ("a100-40gbx8", "full", None),  # fits 8 x 40 GB
        ("h100x8", "full", 12 * GB),  # weights + optimizer state at most 12 GB per GPU
        ("h100x1", "p90", None),  # fits one H100
    ],
)
def test_offline_plan_meets_the_hardware_targets_without_gpu_or_process_group(tmp_path, profile, vocab, budget):
    config = profiled(tmp_path, profile)
    plan, memory = plan_offline(config, config.hardware, vocab)
    assert not dist.is_initialized() and not torch.cuda.is_available()
    assert len(memory) == config.hardware.world_size
    for rank in memory:
        assert rank.fits and rank.hbm <= config.hardware.hbm_cap_gib * GIB, rank
        assert rank.weights > 0 and rank.optimizer > 0  # Adam's state is counted on CUDA
        if budget:
            assert rank.weights + rank.optimizer <= budget, rank
    rows = TAOBAO_MM_ITEM_ROWS[vocab] + 1
    item = plan.plan["sequence_tables"]["item"]
    assert sum(s.shard_sizes[0] for s in item.sharding_spec.shards) == rows
    assert all(str(s.placement.device()).startswith("cuda") for s in item.sharding_spec.shards)
    table_bytes = rows * 16 * 4  # no SCL table (gsu_stage loader): the loaders map its values file, once per host
    assert sum(m.weights for m in memory) > table_bytes  # plus the small tables
    assert "scl_table" not in plan.plan
    assert all(rank.host_mapped == TAOBAO_MM_ROWS["scl"] * 128 for rank in memory)  # once per host, outside the plan


def test_the_replicated_int8_scl_table_is_on_every_rank_outside_the_plan(tmp_path):
    config = profiled(tmp_path, "rtx4090x8", "model.gsu_stage=model", "model.scl_storage=int8_replicated")
    plan, memory = plan_offline(config, config.hardware, "p90")
    assert "scl_table" not in plan.plan
    replicated = TAOBAO_MM_ROWS["scl"] * 128
    for rank in memory:
        assert rank.replicated == replicated and rank.hbm >= replicated + rank.weights + rank.optimizer


def test_full_vocabulary_fits_two_cpu_ranks_only_without_the_scl_table(tmp_path):
    """The fp16 SCL table (9 GB) tips the full item table over 2 x 9 GiB; at gsu_stage loader the
    loaders map the int8 file instead, in the page cache the profile's headroom leaves."""
    config = profiled(tmp_path, "cpu-2core")
    plan, memory = plan_offline(config, config.hardware, "full")
    assert "scl_table" not in plan.plan and all(rank.fits for rank in memory)
    config = profiled(tmp_path, "cpu-2core", "model.gsu_stage=model")
    with pytest.raises(MuseRecError, match="the full tables do not fit 2 x cpu"):
        plan_offline(config, config.hardware, "full")


def test_table_sizes_come_from_the_feature_maps_when_there_are_some(synthetic_root, tmp_path):
    rows, source = table_rows(synthetic_root, "p90")
    assert rows == FeatureMaps.load(DatasetLayout(synthetic_root), "p90").table_rows()
    assert "feature maps" in source and "released" not in source
    rows, source = table_rows(tmp_path, "full")
    assert rows["150_2_180"] == 243_363_021 and rows["129_1"] == 6_929_672 and rows["scl"] == 35_458_468
    assert "released TAOBAO-MM sizes" in source


def test_plan_file_round_trip_is_exact(tmp_path):
    overrides = ("sharding.tables.item.compute_kernels=[fused_uvm_caching]", "sharding.tables.item.cache_load_factor=0.1")
    config = profiled(tmp_path, "rtx4090x8", *overrides)
    plan, _ = plan_offline(config, config.hardware, "full")
    assert plan.plan["sequence_tables"]["item"].cache_params.load_factor == 0.1
    save_plan(tmp_path / "plan.json", plan, config.hardware)
    loaded = load_plan(tmp_path / "plan.json", "cuda", 8)
    assert loaded == plan and str(loaded) == str(plan)


def test_a_plan_for_other_hardware_is_refused(tmp_path):
    config = profiled(tmp_path, "a100-40gbx8")
    plan, _ = plan_offline(config, config.hardware, "p90")
    path = tmp_path / "a100.json"
    save_plan(path, plan, config.hardware)
    with pytest.raises(ConfigError, match=r"device type 'cuda', this job 'cpu'") as error:
        load_plan(path, "cpu", 8)
    assert "world size" not in str(error.value)
    with pytest.raises(ConfigError, match=r"world size 8, this job 2"):
        load_plan(path, "cuda", 2)
    with pytest.raises(ConfigError, match="does not exist"):
        load_plan(tmp_path / "missing.json", "cuda", 8)
    (tmp_path / "other.json").write_text('{"plan": {}}')
    with pytest.raises(ConfigError, match="is not a muse-rec sharding plan"):
        load_plan(tmp_path / "other.json", "cuda", 8)


def test_a_plan_for_other_table_sizes_is_refused_before_dmp(tmp_path):
    config = profiled(tmp_path, "h100x8")
    plan, _ = plan_offline(config, config.hardware, "full")
    save_plan(tmp_path / "full.json", plan, config.hardware)
    rows, _ = table_rows(tmp_path, "p90")
    p90_model = MuseModel(config.model, rows, device=torch.device("meta"))
    with pytest.raises(MuseRecError, match=r"full.json does not fit .* sequence_tables\.item: 243,363,021 x 16 in the plan, 35,458,468 x 16 in the model"):
        load_plan(tmp_path / "full.json", "cuda", 8, p90_model)


def test_a_job_on_other_hardware_than_its_profile_is_refused():
    hardware = load_config_with_profile(None, "h100x8").hardware
    with pytest.raises(ConfigError, match="hardware.device_type is 'cuda' in the hardware profile but this job runs with 'cpu'"):
        topology_from_profile(hardware, "cpu", 8)
    with pytest.raises(ConfigError, match="hardware.world_size is 8 in the hardware profile but this job runs with 2"):
        topology_from_profile(hardware, "cuda", 2)
    with pytest.raises(ConfigError, match="hardware.device_type is not set"):
        topology_from_profile(Config().hardware)


@pytest.mark.parametrize("stage,tables,item_lookups", [("loader", ("item", "category"), [1.0, 50.0, 50.0]), ("model", ("item", "category", "scl"), [1.0, 1000.0])])
def test_default_constraints_are_the_previous_ones(tmp_path, stage, tables, item_lookups):
    """No data-parallel anywhere; pooled (EBC) tables table-wise only on CPU, row-wise too on CUDA;
    sequence tables table- or row-wise; each feature sized as its lookups a sample: target, K kept
    and the last 50 at gsu_stage loader, the 1000-long sequence (and the SCL table) at gsu_stage model."""
    config = load_config(None, [f"model.gsu_stage={stage}"])
    rows, _ = table_rows(tmp_path, "p90")
    model = MuseModel(config.model, rows, device=torch.device("meta"))
    for device, pooled in (("cpu", ["table_wise"]), ("cuda", ["table_wise", "row_wise"])):
        constraints = table_constraints(model, config.sharding, device, config.data.long_seq_len)
        assert constraints["129_1"].sharding_types == pooled and constraints["213"].sharding_types == pooled
        assert {"item", "category", "scl"} & constraints.keys() == set(tables)
        for table in tables:
            assert constraints[table].sharding_types == ["table_wise", "row_wise"]
            assert constraints[table].compute_kernels is None and constraints[table].cache_params is None
        assert constraints["item"].pooling_factors == item_lookups


def test_a_choice_the_device_cannot_shard_with_names_the_key(tmp_path):
    config = profiled(tmp_path, "cpu-2core", "sharding.tables.user.sharding_types=[row_wise]")
    with pytest.raises(ConfigError, match=r"sharding.tables.user.sharding_types: none of \['row_wise'\] is available for table 129_1 on cpu"):
        plan_offline(config, config.hardware, "p90")
    with pytest.raises(ConfigError, match="data_parallel"):
        profiled(tmp_path, "cpu-2core", "sharding.tables.user.sharding_types=[data_parallel]")


def test_profiles_are_checked_and_resolved(tmp_path):
    with pytest.raises(ConfigError, match="not a profile in .*h100x8"):
        load_config_with_profile(None, "tpu-v5")
    (tmp_path / "odd.yaml").write_text("data:\n  batch_size: 5\nhardware:\n  world_size: 2\n")
    with pytest.raises(ConfigError, match="only hardware and sharding belong in a profile, found data"):
        load_config_with_profile(None, str(tmp_path / "odd.yaml"))
    (tmp_path / "typo.yaml").write_text("hardware:\n  hbm_cap: 5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key hardware.hbm_cap"):
        load_config_with_profile(None, str(tmp_path / "typo.yaml"))
    config = load_config_with_profile(None, "h100x8", ["hardware.world_size=4", "data.batch_size=7"])
    assert (config.hardware.world_size, config.data.batch_size, config.sharding.tables.item.sharding_types) == (4, 7, ["row_wise"])


def test_plan_command_prints_placement_and_memory_and_writes_the_file(tmp_path, capsys):
    assert main(["plan", "--hardware", "rtx4090x8", "--vocab", "full", "--out", str(tmp_path), f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "| sequence_tables.item | row_wise | fused | 0-7 |" in out and "| rank | weights | optimizer |" in out
    assert load_plan(tmp_path / "rtx4090x8-full.json", "cuda", 8).plan.keys() == {"id_tables", "sequence_tables"}
    saved = json.loads((tmp_path / "rtx4090x8-full.json").read_text())
    assert saved["host"]["scl_values_file_bytes"] == TAOBAO_MM_ROWS["scl"] * 128  # what each host holds instead


# -- one real use: an offline plan for cpu-2core, loaded by a 2-rank gloo training run ------------
STEPS = 3


def run_with_plan(rank: int, root: str, plan_path: str, init_file: str, out: str) -> None:
    with gloo_group(init_file, rank, 2):
        config = load_config_with_profile(
            None, "cpu-2core", [f"data.root={root}", "data.batch_size=8", "model.keep_top=20", f"sharding.plan={plan_path}"]
        )
        maps = FeatureMaps.load(DatasetLayout(root), "p90")
        sharded = build_model(config, maps, Runtime(rank, 2, torch.device("cpu")))
        item = next(v for k, v in sharded.model.state_dict().items() if k.endswith("sequence_tables.embeddings.item.weight"))
        before = [s.tensor.clone() for s in item.local_shards()]
        pipeline = TrainPipelineSparseDist(sharded.model, sharded.optimizer, torch.device("cpu"))
        batches = iter(ShardDataset(config.data, "train", rank, 2, maps, layout=batch_layout(config.model)))
        losses = [float(pipeline.progress(batches)[0]) for _ in range(STEPS)]
        pipeline.detach()
        result = {
            "plan_used": sharded.plan == load_plan(plan_path, "cpu", 2),
            "losses": losses,
            "item_shards": [(list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)) for s in item.local_shards()],
            "item_moved": any(not torch.equal(b, s.tensor) for b, s in zip(before, item.local_shards())),
        }
        torch.save(result, f"{out}.{rank}")


def test_a_plan_made_offline_for_cpu_2core_trains_on_two_gloo_ranks(synthetic_root, tmp_path):
    config = load_config_with_profile(None, "cpu-2core", [f"data.root={synthetic_root}", "data.batch_size=8"])
    plan, _ = plan_offline(config, config.hardware, "p90")
    item = plan.plan["sequence_tables"]["item"]
    path = tmp_path / "cpu-2core-p90.json"
    save_plan(path, plan, config.hardware)
    out = tmp_path / "result"
    mp.spawn(run_with_plan, args=(str(synthetic_root), str(path), str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(f"{out}.{rank}")
        assert result["plan_used"]
        assert len(result["losses"]) == STEPS and all(0 < loss < 10 for loss in result["losses"])
        assert result["item_moved"]
        expected = [(s.shard_offsets, s.shard_sizes) for s in item.sharding_spec.shards if s.placement.rank() == rank]
        assert result["item_shards"] == expected


# -- what a CUDA job hands fbgemm, checked on CPU ----------------------------------------------------
@pytest.mark.parametrize(
    "optimizer_of,train,trained",
    [("cuda", True, (EmbOptimType.ADAM, 2e-3)), ("cpu", True, (EmbOptimType.EXACT_ROWWISE_ADAGRAD, 0.01)),
     ("cuda", False, (EmbOptimType.EXACT_SGD, 0.0))],
    ids=["cuda", "cpu", "cuda-evaluation"],
)
def test_fused_optimizer_kwargs_are_what_fbgemm_takes(synthetic_root, tmp_path, monkeypatch, optimizer_of, train, trained):
    """The fused params TorchRec builds from the attached optimizers (lr -> learning_rate, the
    optimizer class -> EmbOptimType, every other key as is) reach fbgemm's kernel constructor as
    keyword arguments: each must be one of its parameters. The CUDA optimizer is attached and the
    model sharded by the real DMP on one CPU rank; the kernel class is replaced by a subclass that
    records its kwargs (and runs the CPU kernel with a CPU-capable optimizer, as fbgemm has no CPU Adam).
    An evaluation model (train=False) carries SGD lr 0 on every table: no Adam state to allocate."""
    import inspect

    import torchrec.distributed.batched_embedding_kernel as kernels
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from muse_rec.config import DataConfig, HardwareConfig, OptimConfig, ShardingConfig
    from muse_rec.distributed.sharding import attach_sparse_optimizers, make_planner, sharders

    accepted = set(inspect.signature(SplitTableBatchedEmbeddingBagsCodegen.__init__).parameters) - {"self"}
    assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(SplitTableBatchedEmbeddingBagsCodegen.__init__).parameters.values())
    recorded: list[dict] = []

    class Recording(SplitTableBatchedEmbeddingBagsCodegen):
        def __init__(self, *args, **kwargs):
            recorded.append(dict(kwargs))
            runnable = {k: v for k, v in kwargs.items() if k in accepted}
            if runnable.get("optimizer") not in (EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD):
                runnable["optimizer"] = EmbOptimType.EXACT_ROWWISE_ADAGRAD
            super().__init__(*args, **runnable)

    monkeypatch.setattr(kernels, "SplitTableBatchedEmbeddingBagsCodegen", Recording)
    config = load_config(None, ["model.gsu_stage=model"])  # with the frozen SCL table
    model = MuseModel(config.model, FeatureMaps.load(DatasetLayout(synthetic_root), "p90").table_rows(), device=torch.device("meta"))
    attach_sparse_optimizers(model, OptimConfig(), optimizer_of, train)
    topology = topology_from_profile(HardwareConfig(), "cpu", 1)
    plan = make_planner(model, ShardingConfig(), topology, DataConfig(batch_size=8)).plan(model, sharders())
    with gloo_group(tmp_path / "init"):
        DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders())

    by_table = {name: kwargs for kwargs in recorded for name in kwargs["table_names"]}
    assert {"item", "category", "scl", "129_1"} <= by_table.keys()
    for kwargs in recorded:
        unknown = sorted(set(kwargs) - accepted)
        assert not unknown, f"fbgemm's SplitTableBatchedEmbeddingBagsCodegen takes no {unknown} (tables {kwargs['table_names']})"
    for name, kwargs in by_table.items():
        expected = (EmbOptimType.EXACT_SGD, 0.0) if name == "scl" else trained  # the frozen SCL table: SGD, lr 0
        assert (kwargs["optimizer"], kwargs["learning_rate"]) == expected, name
        assert "lr" not in kwargs and "betas" not in kwargs
    if optimizer_of == "cuda" and train:
        assert (by_table["item"]["beta1"], by_table["item"]["beta2"], by_table["item"]["eps"]) == (0.9, 0.999, 1e-8)


def test_a_cuda_job_without_a_profile_plans_into_its_gpu_and_hosts():
    """Unset caps come from the running job on CUDA (the card's memory, LOCAL_WORLD_SIZE), not
    TorchRec's 32 GiB default; a profile's values win; CPU jobs are unchanged."""
    h100 = 85_029_158_912  # torch.cuda.get_device_properties(0).total_memory of an H100 80 GB (79.19 GiB)
    hardware = running_hardware(HardwareConfig(), "cuda", h100, {"LOCAL_WORLD_SIZE": "8"})
    assert (hardware.hbm_cap_gib, hardware.local_world_size) == (h100 / GIB, 8)
    topology = topology_from_profile(hardware, "cuda", 16)
    assert topology.devices[0].storage.hbm == int(h100 / GIB * GIB) and topology.local_world_size == 8
    assert topology_from_profile(HardwareConfig(), "cuda", 16).devices[0].storage.hbm == 32 * GIB  # what it was before
    assert running_hardware(HardwareConfig(), "cuda", h100, {}).local_world_size is None
    profile = load_config_with_profile(None, "h100x1").hardware
    assert running_hardware(profile, "cuda", 2 * h100, {"LOCAL_WORLD_SIZE": "4"}) == profile
    assert running_hardware(HardwareConfig(), "cpu", h100, {"LOCAL_WORLD_SIZE": "2"}) == HardwareConfig()
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE='eight'"):
        running_hardware(HardwareConfig(), "cuda", h100, {"LOCAL_WORLD_SIZE": "eight"})


def test_the_content_encoder_can_have_a_learning_rate_of_its_own():
    from muse_rec.config import OptimConfig
    from muse_rec.distributed.sharding import dense_optimizer

    named = {"dense.tower.layers.0.weight": torch.nn.Parameter(torch.zeros(2)),
             "targets.encoder.embed.weight": torch.nn.Parameter(torch.zeros(3))}
    params = list(named.values())
    own = dense_optimizer(params, named, OptimConfig(dense_lr=1e-3, encoder_lr=1e-5))
    assert [(g["lr"], [p.numel() for p in g["params"]]) for g in own.param_groups] == [(1e-3, [2]), (1e-5, [3])]
    shared = dense_optimizer(params, named, OptimConfig(dense_lr=1e-3))
    assert [(g["lr"], len(g["params"])) for g in shared.param_groups] == [(1e-3, 2)]
    assert all(g["weight_decay"] == OptimConfig().dense_weight_decay for g in own.param_groups)


def test_the_encoders_token_embeddings_can_have_a_learning_rate_of_their_own():
    from muse_rec.config import OptimConfig
    from muse_rec.distributed.sharding import dense_optimizer

    named = {"dense.tower.layers.0.weight": torch.nn.Parameter(torch.zeros(2)),
             "targets.encoder.embed.weight": torch.nn.Parameter(torch.zeros(3)),
             "targets.encoder.out.weight": torch.nn.Parameter(torch.zeros(4))}
    params = list(named.values())
    both = dense_optimizer(params, named, OptimConfig(dense_lr=1e-3, encoder_lr=1e-5, encoder_embedding_lr=1e-2))
    assert [(g["lr"], [p.numel() for p in g["params"]]) for g in both.param_groups] == [(1e-3, [2]), (1e-5, [4]), (1e-2, [3])]
    tokens_only = dense_optimizer(params, named, OptimConfig(dense_lr=1e-3, encoder_embedding_lr=1e-2))
    assert [(g["lr"], [p.numel() for p in g["params"]]) for g in tokens_only.param_groups] == [(1e-3, [2]), (1e-3, [4]), (1e-2, [3])]
