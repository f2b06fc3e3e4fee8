"""From a plain `MuseModel` to a DistributedModelParallel one: fused sparse optimizers, plan, DMP.

Order matters (see shared/spec/torchrec-notes.md): the in-backward optimizers are attached to the
(meta) model *before* planning, so the planner counts their state; the frozen SCL table gets SGD
with lr 0, so nothing can ever update it, not even the default optimizer TorchRec would attach.
Dense parameters are wrapped in DDP by DMP and optimised by the returned dense optimizer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from muse_rec.config import OptimConfig
from muse_rec.model.muse import MuseModel
from muse_rec.model.tables import CATE_TABLE, ITEM_TABLE, SCL_TABLE

log = logging.getLogger(__name__)


def sparse_optimizer(config: OptimConfig, device_type: str) -> tuple[type[torch.optim.Optimizer], dict]:
    """Adam on CUDA (the reference's lazy Adam); on CPU, where fbgemm has no fused Adam, the
    documented fallback `optim.sparse_cpu` (row-wise Adagrad by default)."""
    if device_type == "cuda":
        return torch.optim.Adam, {"lr": config.sparse_lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if config.sparse_cpu == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": config.sparse_cpu_lr, "eps": 1e-8}
    return torch.optim.SGD, {"lr": config.sparse_cpu_lr}


def attach_sparse_optimizers(model: MuseModel, config: OptimConfig, device_type: str) -> None:
    optimizer, kwargs = sparse_optimizer(config, device_type)
    trainable = [*model.id_tables.parameters(), *model.sequence_tables.parameters()]
    apply_optimizer_in_backward(optimizer, trainable, kwargs)
    scl = list(model.scl_table.parameters())  # none when the table is replicated int8
    if scl:
        apply_optimizer_in_backward(torch.optim.SGD, scl, {"lr": 0.0})


def table_constraints(model: MuseModel, device_type: str) -> dict[str, ParameterConstraints]:
    """Sharding types the tables may use. Data-parallel is excluded: such tables would lose their
    fused optimizer. On CPU, EmbeddingBagCollections shard table-wise only (row-wise needs a manual
    plan there) and EmbeddingCollections table- or row-wise."""
    pooled = [ShardingType.TABLE_WISE.value] + ([ShardingType.ROW_WISE.value] if device_type == "cuda" else [])
    sequence = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]
    constraints = {name: ParameterConstraints(sharding_types=pooled) for name in model.id_tables.embedding_bags}
    for name in (ITEM_TABLE, CATE_TABLE, SCL_TABLE):  # SCL_TABLE is unused when replicated
        constraints[name] = ParameterConstraints(sharding_types=sequence)
    return constraints


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    optimizer: CombinedOptimizer  # fused sparse (stepped in backward) + dense AdamW
    dense_optimizer: KeyedOptimizerWrapper  # the AdamW part: its state is lazy, unlike the fused one's
    plan: ShardingPlan


def shard_model(
    model: MuseModel, optim: OptimConfig, device: torch.device, plan: ShardingPlan | None = None
) -> ShardedModel:
    """Attach optimizers, plan collectively (unless a plan is given) and wrap in DMP."""
    attach_sparse_optimizers(model, optim, device.type)
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if plan is None:
        topology = Topology(world_size=world_size, compute_device=device.type)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=table_constraints(model, device.type))
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD) if dist.is_initialized() else planner.plan(model, sharders)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.AdamW(params, lr=optim.dense_lr, betas=(0.9, 0.999), weight_decay=optim.dense_weight_decay),
    )
    return ShardedModel(dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), dense, plan)


def dense_module(model: nn.Module) -> nn.Module:
    """The user's module inside DMP (and DDP) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
