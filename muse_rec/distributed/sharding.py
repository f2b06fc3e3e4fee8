"""From a plain `MuseModel` to a DistributedModelParallel one: fused sparse optimizers, plan, DMP.

Order matters (see shared/spec/torchrec-notes.md): the in-backward optimizers are attached to the
(meta) model *before* planning, so the planner counts their state; the frozen SCL table (and
lemur's memory bank, written in place) gets SGD with lr 0, so no optimizer can ever update it, not
even the default one TorchRec would attach.
Dense parameters are wrapped in DDP by DMP and optimised by the returned dense optimizer. What the
planner may choose per table comes from the config (`sharding.tables`), the memory it plans into
from the hardware profile (`hardware`); a saved plan (`muse_rec.distributed.planning`) skips planning.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import Adam as TorchRecAdam
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from muse_rec import schema
from muse_rec.config import DataConfig, HardwareConfig, OptimConfig, ShardingConfig, TableShardingConfig
from muse_rec.distributed.topology import running_hardware, topology_from_profile
from muse_rec.errors import ConfigError
from muse_rec.model.lemur import LemurModel
from muse_rec.model.memory_bank import BANK_TABLE
from muse_rec.model.muse import MuseModel
from muse_rec.model.tables import CATE_TABLE, ITEM_TABLE, SCL_TABLE, ReplicatedInt8Table

log = logging.getLogger(__name__)


def sparse_optimizer(config: OptimConfig, device_type: str) -> tuple[type[torch.optim.Optimizer], dict]:
    """Adam on CUDA (the reference's lazy Adam); on CPU, where fbgemm has no fused Adam, the
    documented fallback `optim.sparse_cpu` (row-wise Adagrad by default).

    The kwargs are fbgemm's, not torch's: TorchRec renames only `lr` (to `learning_rate`) and hands
    every other key as is to fbgemm's `SplitTableBatchedEmbeddingBagsCodegen`, which takes
    `beta1`/`beta2` (torch's `betas` is a TypeError there). `torch.optim.Adam` itself would refuse
    `beta1` when the optimizer is attached, so CUDA uses TorchRec's placeholder `torchrec.optim.Adam`
    (it accepts fbgemm's kwargs and maps to the same fused EmbOptimType.ADAM, with the planner
    counting the same 2 x the weights of state), in torchrec 1.6.1 and 1.8.0 alike."""
    if device_type == "cuda":
        return TorchRecAdam, {"lr": config.sparse_lr, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    if config.sparse_cpu == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": config.sparse_cpu_lr, "eps": 1e-8}
    return torch.optim.SGD, {"lr": config.sparse_cpu_lr}


def attach_sparse_optimizers(model: MuseModel, config: OptimConfig, device_type: str, train: bool = True) -> None:
    """The configured sparse optimizer on the trained tables; SGD lr 0 (no state) on the frozen
    ones, and on every table when not `train` (evaluation: no Adam state to allocate or plan for)."""
    trainable = [*model.id_tables.parameters(), *model.sequence_tables.parameters()]
    frozen = list(model.scl_table.parameters()) if model.scl_table is not None else []  # none when replicated int8
    frozen += list(model.bank_table.parameters()) if isinstance(model, LemurModel) else []  # written in place, never trained
    if train:
        optimizer, kwargs = sparse_optimizer(config, device_type)
        apply_optimizer_in_backward(optimizer, trainable, kwargs)
    else:
        frozen += trainable
    if frozen:
        apply_optimizer_in_backward(torch.optim.SGD, frozen, {"lr": 0.0})


TABLE_GROUPS = {ITEM_TABLE: "item", CATE_TABLE: "category", SCL_TABLE: "scl", schema.USER: "user", BANK_TABLE: "bank"}
"""Key under `sharding.tables` of each table; every other table is one of the small `attributes`."""


def sharders() -> list[ModuleSharder]:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def planned_tables(model: MuseModel) -> list[tuple[str, ModuleSharder, BaseEmbeddingConfig]]:
    """(module path, its sharder, table config) of every table the planner places; the replicated
    int8 SCL table is no TorchRec module and is not among them, and at gsu_stage loader there is
    no SCL table at all (the loaders read the values file)."""
    ebc, ec = sharders()
    tables = [("id_tables", ebc, t) for t in model.id_tables.embedding_bag_configs()]
    tables += [("sequence_tables", ec, t) for t in model.sequence_tables.embedding_configs()]
    if isinstance(model.scl_table, EmbeddingCollection):
        tables += [("scl_table", ec, t) for t in model.scl_table.embedding_configs()]
    if isinstance(model, LemurModel):
        tables += [("bank_table", ec, t) for t in model.bank_table.embedding_configs()]
    return tables


def table_constraints(model: MuseModel, sharding: ShardingConfig, device_type: str, long_seq_len: int) -> dict[str, ParameterConstraints]:
    """Each table's choices from `sharding.tables` (data_parallel is never among them: such tables
    would lose their fused optimizer), narrowed to what its sharder supports on `device_type`
    (on CPU, EmbeddingBagCollections shard neither row-wise nor with UVM), and its lookups per
    sample (`Batch`'s feature lengths: L for a whole sequence, K and S at gsu_stage loader), so the
    planner sizes the input/output buffers of each feature as such."""
    lengths = model.layout.sequence_lengths(long_seq_len) | model.layout.scl_lengths(long_seq_len)
    constraints = {}
    for _, sharder, table in planned_tables(model):
        group = TABLE_GROUPS.get(table.name, "attributes")
        choice: TableShardingConfig = getattr(sharding.tables, group)
        key = f"sharding.tables.{group}"
        sharding_types = _supported(f"{key}.sharding_types", choice.sharding_types, sharder.sharding_types(device_type), table.name, device_type)
        kernels = {k for t in sharding_types for k in sharder.compute_kernels(t, device_type)}
        chosen_kernels = choice.compute_kernels
        if group == "bank":  # written in place: a device cache in front of it would serve stale rows
            kernels.discard("fused_uvm_caching")
            chosen_kernels = chosen_kernels or sorted(k for k in kernels if k.startswith("fused"))
        constraints[table.name] = ParameterConstraints(
            sharding_types=sharding_types,
            compute_kernels=None
            if chosen_kernels is None
            else _supported(f"{key}.compute_kernels", chosen_kernels, kernels, table.name, device_type),
            cache_params=None if choice.cache_load_factor is None else CacheParams(load_factor=choice.cache_load_factor),
            pooling_factors=[float(lengths.get(f, 1)) for f in table.feature_names],
        )
    return constraints


def _supported(key: str, chosen: list[str], offered: Collection[str], table: str, device_type: str) -> list[str]:
    kept = [c for c in chosen if c in offered]
    if not kept:
        usable = sorted(o for o in offered if o not in (ShardingType.DATA_PARALLEL.value, "dense"))
        raise ConfigError(f"{key}: none of {chosen} is available for table {table} on {device_type} (available: {usable})")
    return kept


RESERVED_SHARE = 0.15
"""Share of each rank's memory the planner leaves free as a margin: TorchRec's default."""
DENSE_MULTIPLIER = 6
"""Dense memory per dense parameter byte: TorchRec's heuristic (parameter, optimizer state, DDP buckets)."""


def make_planner(model: MuseModel, sharding: ShardingConfig, topology: Topology, data: DataConfig) -> EmbeddingShardingPlanner:
    """The planner for `model` on `topology`, for batches of `data.batch_size` per rank. Memory every
    rank holds outside the plan is reserved as the "dense" estimate (device memory on CUDA, host
    memory on CPU): the dense arch, and the replicated int8 SCL table if there is one."""
    dense = sum(t.numel() * t.element_size() for t in model.dense.parameters())
    with warnings.catch_warnings():  # torchrec 1.8 always warns of dry runs without a dense estimate: one is given
        warnings.filterwarnings("ignore", "HeuristicalStorageReservation", FutureWarning)
        reservation = HeuristicalStorageReservation(RESERVED_SHARE, dense_tensor_estimate=DENSE_MULTIPLIER * dense + replicated_bytes(model))
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=data.batch_size,
        storage_reservation=reservation,
        constraints=table_constraints(model, sharding, topology.compute_device, data.long_seq_len),
    )


def replicated_bytes(model: MuseModel) -> int:
    """Bytes of the replicated int8 SCL table on each rank (its values; row 0 is computed)."""
    return sum((m.num_rows - 1) * schema.SCL_DIM for m in model.modules() if isinstance(m, ReplicatedInt8Table))


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer  # fused sparse (stepped in backward) + dense AdamW
    dense_optimizer: KeyedOptimizerWrapper  # the AdamW part: its state is lazy, unlike the fused one's
    plan: ShardingPlan


def shard_model(
    model: MuseModel,
    optim: OptimConfig,
    device: torch.device,
    plan: ShardingPlan | None = None,
    sharding: ShardingConfig | None = None,
    hardware: HardwareConfig | None = None,
    data: DataConfig | None = None,
    train: bool = True,
) -> ShardedModel:
    """Attach optimizers, plan collectively (unless a plan is given) and wrap in DMP. Planning
    follows `sharding.tables` on the `hardware` profile for `data`'s batch size and sequence
    length; what the profile leaves unset is the running job's (on CUDA: the GPU's memory and
    LOCAL_WORLD_SIZE, `running_hardware`; otherwise TorchRec's defaults)."""
    attach_sparse_optimizers(model, optim, device.type, train)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if plan is None:
        hardware = hardware or HardwareConfig()
        if device.type == "cuda":  # what the profile leaves out: this GPU's memory, torchrun's ranks per host
            hardware = running_hardware(hardware, device.type, torch.cuda.get_device_properties(device).total_memory, os.environ)
        topology = topology_from_profile(hardware, device.type, world_size)
        planner = make_planner(model, sharding or ShardingConfig(), topology, data or DataConfig())
        plan = planner.collective_plan(model, sharders(), dist.GroupMember.WORLD) if dist.is_initialized() else planner.plan(model, sharders())
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders())
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(dense_params, lambda params: dense_optimizer(params, dense_params, optim))
    return ShardedModel(dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), dense, plan)


ENCODER_PARAMETERS = ".encoder."
"""Names of lemur's content-encoder parameters contain this (`TargetEncoding.encoder`)."""
ENCODER_EMBEDDING = ".embed."
"""... and its token (or SCL-chunk) embedding's this (`ContentEncoder.embed`)."""


def dense_optimizer(params: list[torch.Tensor], named: dict[str, torch.Tensor], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the dense parameters; lemur's content encoder in a group of its own at
    `optim.encoder_lr` when that is set, and its token embeddings in another at
    `optim.encoder_embedding_lr` when that is set."""
    encoder = {id(p) for name, p in named.items() if ENCODER_PARAMETERS in name}
    embedding = {id(p) for name, p in named.items() if ENCODER_PARAMETERS in name and ENCODER_EMBEDDING in name}
    if optim.encoder_embedding_lr is None:
        embedding = set()
    rest = [p for p in params if id(p) not in encoder]
    groups = [{"params": list(params)}]
    if encoder and (optim.encoder_lr is not None or embedding):
        groups = [{"params": rest}] if rest else []
        layers = [p for p in params if id(p) in encoder and id(p) not in embedding]
        if layers:
            groups.append({"params": layers, "lr": optim.encoder_lr if optim.encoder_lr is not None else optim.dense_lr})
        if embedding:
            groups.append({"params": [p for p in params if id(p) in embedding], "lr": optim.encoder_embedding_lr})
    return torch.optim.AdamW(groups, lr=optim.dense_lr, betas=(0.9, 0.999), weight_decay=optim.dense_weight_decay)


def dense_module(model: nn.Module) -> nn.Module:
    """The user's module inside DMP (and DDP) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
