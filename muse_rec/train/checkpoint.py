"""Checkpoints with torch.distributed.checkpoint: sharded tables, dense weights, both optimizers'
states and the data position, in `<run>/checkpoints/step-NNNNNNNN/`.

The frozen SCL table is left out (9 GB at TAOBAO-MM p90 size): it is the data set's values file,
which `build_model` loads into every model before a checkpoint is loaded over the rest.

Every rank writes its own shards; the directory is written under a temporary name and renamed by
rank 0 once all ranks are done, then `latest` (a one-line file, replaced atomically) points to it.
Nothing complete is deleted before `latest` names its successor: a checkpoint of the same step is
renamed aside first, and old ones are pruned last. A directory is complete once it holds `meta.json`
(written last, deleted first). A save killed at any moment therefore leaves either the previous
complete checkpoint or the new one, never half of one, and `latest()` finds it even where the kill
left `latest` naming a step that was renamed aside.

DCP reshards on load, so a checkpoint loads into another world size or sharding plan. Resuming
*training* is stricter, and `check_resumable` refuses a mismatch before anything is loaded: the
checkpoint must be this run's (`RunIdentity`: method, data, vocabulary, table sizes), and the data
position is a step count that only means the same batches under the same world size, batch size
and loader worker count.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from muse_rec.config import Config
from muse_rec.data.atomic import atomic_path, partial_name
from muse_rec.distributed.sharding import ShardedModel
from muse_rec.distributed.table_weights import SCL_WEIGHT_SUFFIX
from muse_rec.errors import MuseRecError

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
ASIDE = ".aside"
"""Suffix of a checkpoint renamed aside while the same step is saved again (`.step-NNNNNNNN.aside`)."""
FRESH_START = "start fresh with another train.out or train.resume=false"
T = TypeVar("T")


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps taken on the train split, and the batching that
    gives those steps their meaning (the split over ranks, and the loader workers, which fix the
    order batches come in: `muse_rec.data.loader.batch_order`)."""

    step: int
    world_size: int
    batch_size: int
    num_workers: int


@dataclass(frozen=True)
class RunIdentity:
    """What makes a checkpoint this run's: runs share `train.out` by default, and resuming another
    run's weights (the quickstart's synthetic ones, say) would silently train the wrong model."""

    method: str
    data_root: str  # resolved: the same directory however it was spelled
    vocab: str
    table_rows: dict[str, int]  # from the feature maps: other data behind the same path shows here


def run_identity(config: Config, table_rows: dict[str, int]) -> RunIdentity:
    """This run's identity; `table_rows` from its feature maps (`FeatureMaps.table_rows`)."""
    return RunIdentity(config.model.method, str(Path(config.data.root).resolve()), config.data.vocab, dict(table_rows))


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, or None before the first. Where a save
    was killed between its renames (`latest` missing, or naming a step renamed aside), the newest
    complete checkpoint instead, with a warning: a run resumes rather than being blocked."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.exists() else None
    if named is not None and _is_complete(named):
        return named
    found = _complete_checkpoints(root)
    if not found:
        if named is None:
            return None
        raise MuseRecError(f"{pointer} names {named}, which is not a complete checkpoint, and there is no other; {FRESH_START}")
    state = f"names {named.name}, not a complete checkpoint" if named else "is missing"
    log.warning("%s %s (a save was interrupted): using the newest complete checkpoint, %s", pointer, state, found[-1])
    return found[-1]


def _is_complete(path: Path) -> bool:
    """`meta.json` is written last and deleted first."""
    return (path / META).exists()


def _complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, published or renamed aside, oldest first."""
    found = [*root.glob("step-[0-9]*"), *root.glob(f".step-[0-9]*{ASIDE}")]
    return sorted((p for p in found if _is_complete(p)), key=_age)


def _age(path: Path) -> tuple[int, bool]:
    """The step, then a published checkpoint after an aside copy of the same step."""
    return int(re.search(r"step-(\d+)", path.name)[1]), path.name.startswith("step-")


def save(run_dir: Path, sharded: ShardedModel, position: Position, run: RunIdentity, config: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{position.step:08d}"
    staging = partial_name(final)
    rank = dist.get_rank()
    if rank == 0:
        _remove(staging)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": _model_state(sharded), "optimizer": _optimizer_state(sharded)}, checkpoint_id=staging)
    if rank == 0:
        write_meta(staging, position, run, config)
        _publish(staging, final)
        _prune(root, final, keep)
        log.info("checkpoint: %s", final)
    dist.barrier()
    return final


def _publish(staging: Path, final: Path) -> None:
    """Rename `staging` to `final` and point `latest` at it. An existing `final` (the same step saved
    again) is renamed aside, not deleted, until `latest` names the new one."""
    aside = final.with_name(f".{final.name}{ASIDE}")
    if final.exists():
        _remove(aside)
        final.rename(aside)
    staging.rename(final)
    with atomic_path(final.parent / LATEST) as tmp:
        tmp.write_text(final.name + "\n")
    _remove(aside)


def _prune(root: Path, final: Path, keep: int) -> None:
    """Keep `final` (which `latest` names) and the `keep - 1` newest other complete checkpoints;
    delete the rest, and what interrupted saves left (staging dirs, aside copies, half-deleted dirs)."""
    published = [p for p in _complete_checkpoints(root) if p.name.startswith("step-") and p != final]
    kept = {final, *published[max(len(published) - (keep - 1), 0):]}
    for path in [*root.glob("step-[0-9]*"), *root.glob(".step-[0-9]*")]:  # .step-*: staging dirs, aside copies
        if path not in kept:
            _remove(path)


def _remove(path: Path) -> None:
    """Delete a checkpoint directory, `meta.json` first: a deletion cut short leaves no directory
    that looks complete."""
    (path / META).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def write_meta(path: Path, position: Position, run: RunIdentity, config: dict) -> None:
    """What `check_resumable` and `muse-rec eval` read back: the position, the run, the resolved config."""
    (Path(path) / META).write_text(json.dumps({"position": asdict(position), "run": asdict(run), "config": config}, indent=2) + "\n")


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except FileNotFoundError:
        raise MuseRecError(f"{path}: not a muse_rec checkpoint (no {META})") from None


def load(path: Path, sharded: ShardedModel, with_optimizer: bool) -> Position:
    """Load weights (and optimizer states) into however this model is sharded; returns the position.
    The model's SCL table keeps the values `build_model` filled it with."""
    position = read_record(read_meta(path), "position", Position, path)
    state = {"model": _model_state(sharded)}
    if with_optimizer:
        sharded.dense_optimizer.init_state()  # materialise AdamW's lazy state so DCP can load into it
        state["optimizer"] = _optimizer_state(sharded)
    # In place: the state dict's tensors share the parameters' storage, so no load_state_dict (which
    # TorchRec's sharded tables refuse without their SCL entry) follows.
    dcp.load(state, checkpoint_id=path)
    if with_optimizer:
        full = sharded.optimizer.state_dict()
        full["state"].update(state["optimizer"]["state"])
        sharded.optimizer.load_state_dict({**state["optimizer"], "state": full["state"]})
    return position


def read_record(meta: dict, key: str, cls: type[T], path: Path) -> T:
    """`meta[key]` as a `cls`, or an error naming the fields an older muse_rec did not write."""
    record = meta.get(key, {})
    missing = [f"{key}.{f.name}" for f in fields(cls) if f.name not in record]
    if missing:
        raise MuseRecError(f"{path}: {META} has no {', '.join(missing)} (an older muse_rec's checkpoint); {FRESH_START}")
    return cls(**{f.name: record[f.name] for f in fields(cls)})


def load_weights(path: Path, sharded: ShardedModel, contains: str) -> list[str]:
    """Load only the model tensors whose name contains `contains` (e.g. an encoder trained by another
    run); returns their names. Refuses a selection that matches nothing."""
    read_meta(path)
    state = {k: v for k, v in sharded.model.state_dict().items() if contains in k}
    if not state:
        raise MuseRecError(f"no model tensor named like {contains!r} to load from {path}")
    dcp.load({"model": state}, checkpoint_id=path)  # in place: state dict tensors share the parameters' storage
    return sorted(state)


def _model_state(sharded: ShardedModel) -> dict:
    """The model's state dict without the frozen SCL table: the data set's file, not a training result."""
    return _without_scl(sharded.model.state_dict())


def _optimizer_state(sharded: ShardedModel) -> dict:
    """Both optimizers' state dict without the SCL table's entry and without empty entries (the
    frozen tables' SGD has no state; DCP drops empty dicts when saving, and would then miss the
    key when loading)."""
    state = sharded.optimizer.state_dict()
    return {**state, "state": {key: value for key, value in _without_scl(state["state"]).items() if value}}


def _without_scl(state: dict[str, T]) -> dict[str, T]:
    """`state` less the SCL table's weight, under which both the model and the optimizer key it."""
    return {key: value for key, value in state.items() if not key.endswith(SCL_WEIGHT_SUFFIX)}


def check_resumable(path: Path, run: RunIdentity, world_size: int, batch_size: int, num_workers: int) -> None:
    """Refuse to resume training from `path` unless it is this run's and its step count means the
    same batches here. Called before loading, so a mismatch is this error, not a shape error."""
    meta = read_meta(path)
    _check_same_run(path, read_record(meta, "run", RunIdentity, path), run)
    saved: Position = read_record(meta, "position", Position, path)
    if (saved.world_size, saved.batch_size) != (world_size, batch_size):
        raise MuseRecError(
            f"{path}: saved with {saved.world_size} rank(s) x batch {saved.batch_size} (data.batch_size); resuming training "
            f"exactly needs the same, this run has {world_size} x {batch_size} (evaluating it works at any size), or "
            f"{FRESH_START}"
        )
    if _readers(saved.num_workers) != _readers(num_workers):
        raise MuseRecError(
            f"{path}: saved with data.num_workers={saved.num_workers}, this run has data.num_workers={num_workers}; the "
            f"workers fix the order of the batches, so step {saved.step} would replay or skip some: resume with "
            f"data.num_workers={saved.num_workers}, or {FRESH_START}"
        )


def _check_same_run(path: Path, saved: RunIdentity, here: RunIdentity) -> None:
    for key, there, now in (
        ("model.method", saved.method, here.method),
        ("data.root", saved.data_root, here.data_root),
        ("data.vocab", saved.vocab, here.vocab),
    ):
        if there != now:
            raise MuseRecError(f"{path}: another run's checkpoint ({key} is {there!r} there, {now!r} here); {FRESH_START}")
    for table in sorted(saved.table_rows.keys() | here.table_rows.keys()):
        there, now = saved.table_rows.get(table), here.table_rows.get(table)
        if there != now:
            raise MuseRecError(
                f"{path}: another run's checkpoint (table {table} has {there} rows there, {now} here: the feature maps "
                f"of data.root differ); {FRESH_START}"
            )


def _readers(num_workers: int) -> int:
    """Processes reading batches: 0 workers (the training process reads) orders them like 1."""
    return max(num_workers, 1)
