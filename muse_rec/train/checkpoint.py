"""Checkpoints with torch.distributed.checkpoint: sharded tables, dense weights, both optimizers'
states and the data position, in `<run>/checkpoints/step-NNNNNNNN/`.

Every rank writes its own shards; the directory is written under a temporary name and renamed by
rank 0 once all ranks are done, then `latest` (a one-line file, replaced atomically) points to it.
A run killed at any moment therefore finds either the previous complete checkpoint or the new
one, never half of one. DCP reshards on load, so a checkpoint loads into another world size or
sharding plan; resuming *training* exactly additionally needs the same world size and batch size
(the data position is a step count of that split), which `load` checks.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from muse_rec.data.atomic import atomic_path
from muse_rec.distributed.sharding import ShardedModel
from muse_rec.errors import MuseRecError

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps taken on the train split, and how it was split."""

    step: int
    world_size: int
    batch_size: int


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / META).exists():
        raise MuseRecError(f"{pointer} points to {path}, which is not a complete checkpoint")
    return path


def save(run_dir: Path, sharded: ShardedModel, position: Position, config: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{position.step:08d}"
    staging = root / f".{final.name}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": sharded.model.state_dict(), "optimizer": _optimizer_state(sharded)}, checkpoint_id=staging)
    if rank == 0:
        (staging / META).write_text(json.dumps({"position": position.__dict__, "config": config}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        with atomic_path(root / LATEST) as tmp:
            tmp.write_text(final.name + "\n")
        older = sorted(p for p in root.glob("step-*") if p != final)
        for old in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old)
        log.info("checkpoint: %s", final)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except FileNotFoundError:
        raise MuseRecError(f"{path}: not a muse_rec checkpoint (no {META})") from None


def load(path: Path, sharded: ShardedModel, with_optimizer: bool) -> Position:
    """Load weights (and optimizer states) into however this model is sharded; returns the position."""
    meta = read_meta(path)
    state = {"model": sharded.model.state_dict()}
    if with_optimizer:
        sharded.dense_optimizer.init_state()  # materialise AdamW's lazy state so DCP can load into it
        state["optimizer"] = _optimizer_state(sharded)
    dcp.load(state, checkpoint_id=path)
    sharded.model.load_state_dict(state["model"])
    if with_optimizer:
        full = sharded.optimizer.state_dict()
        full["state"].update(state["optimizer"]["state"])
        sharded.optimizer.load_state_dict({**state["optimizer"], "state": full["state"]})
    return Position(**meta["position"])


def load_weights(path: Path, sharded: ShardedModel, contains: str) -> list[str]:
    """Load only the model tensors whose name contains `contains` (e.g. an encoder trained by another
    run); returns their names. Refuses a selection that matches nothing."""
    read_meta(path)
    state = {k: v for k, v in sharded.model.state_dict().items() if contains in k}
    if not state:
        raise MuseRecError(f"no model tensor named like {contains!r} to load from {path}")
    dcp.load({"model": state}, checkpoint_id=path)  # in place: state dict tensors share the parameters' storage
    return sorted(state)


def _optimizer_state(sharded: ShardedModel) -> dict:
    """Both optimizers' state dict without the frozen SCL table's empty entry (DCP drops empty
    dicts when saving, and would then miss the key when loading)."""
    state = sharded.optimizer.state_dict()
    return {**state, "state": {key: value for key, value in state["state"].items() if value}}


def check_resumable(position: Position, world_size: int, batch_size: int, path: Path) -> None:
    if (position.world_size, position.batch_size) != (world_size, batch_size):
        raise MuseRecError(
            f"{path}: saved with {position.world_size} rank(s) x batch {position.batch_size}; resuming training "
            f"exactly needs the same, this run has {world_size} x {batch_size} (evaluating it works at any size)"
        )
