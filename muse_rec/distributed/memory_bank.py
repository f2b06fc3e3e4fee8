"""The distributed side of lemur's memory bank: the all-gather that shares each step's freshly
encoded targets with every rank, binding the writer to this rank's pieces of the sharded bank
table, and its statistics summed over ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from muse_rec.distributed.table_weights import local_pieces
from muse_rec.model.lemur import TargetEncoding
from muse_rec.model.memory_bank import BANK_TABLE, BankWriter, bank_metrics

BANK_WEIGHT_SUFFIX = f"bank_table.embeddings.{BANK_TABLE}.weight"


def all_gather_rows(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows (N_r,), values (N_r, d)), concatenated in rank order; N_r may differ."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows, values
    world = dist.get_world_size()
    count = torch.tensor([rows.numel()], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)
    out = []
    for tensor in (rows, values):  # padded to the longest rank's count, as all_gather wants equal shapes
        padded = tensor.new_zeros(longest, *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out.append(torch.cat([g[:n] for g, n in zip(gathered, counts)]))
    return out[0], out[1]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place; a no-op on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def bind_memory_bank(model: nn.Module) -> None:
    """Point lemur's bank writer at the bank pieces this rank holds and zero them, and give the
    encoder's centring its all-reduce (no-op for other methods). Call after sharding; checkpoint
    loads write into the same storage."""
    state = model.state_dict()
    keys = [k for k in state if k.endswith(BANK_WEIGHT_SUFFIX)]
    if not keys:
        return
    (writer,) = [m for m in model.modules() if isinstance(m, BankWriter)]
    writer.bind(local_pieces(state[keys[0]]), all_gather_rows)
    writer.clear()
    for module in model.modules():
        if isinstance(module, TargetEncoding):
            module.reduce = all_reduce_sum


def gather_bank_metrics(model: nn.Module) -> dict[str, float]:
    """Coverage and staleness since the last call, over all ranks (collective); {} for other methods."""
    owners = [m for m in model.modules() if hasattr(m, "pop_bank_stats")]
    if not owners:
        return {}
    sums = owners[0].pop_bank_stats()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return bank_metrics(sums)
