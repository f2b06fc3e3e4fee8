"""lemur's warm start: the memory bank filled, before the first training step, with the items the
training will read, so that history reads find what they look up from step one (coverage) instead
of only the items that happened to be targets already.

1. Which items (`model.lemur.warm_start`). 'train_items': one scan of the train split, shared by
   the ranks (row group i to rank i mod world), reading only the history and target columns: the
   last `data.long_seq_len` items of each history (what the model reads) and the targets, remapped
   to item rows; the ranks' sets are merged by an all-reduce of a byte per item row (35 MB at the
   p90 vocabulary, 243 MB full). 'all_items': every row of the item table, no scan.
2. Who encodes. Each rank encodes the chosen rows of the bank pieces it holds (row-wise: 1/world of
   the rows each) and stores them in place: no value crosses the network, and each distinct item is
   encoded once (a row held by several column-wise pieces on one rank once per rank). Chunks of
   `warm_start_chunk` items, without gradient (`ContentEncoder.encode_for_bank`), centred by the
   running mean as evaluation is; a fresh encoder's running mean is first set to the mean output over
   a sample of train targets (`calibration_rows`, the same on every rank).
3. Progress and resume. tqdm over rank 0's chunks; the log and the returned record (written to
   metrics.jsonl) give items, seconds for the scan and the encoding, items/s and the share of the
   item table covered. The bank and the chunks done are saved to `<train.out>/warm_start/` every
   `warm_start_save_every` chunks and when complete (a DCP directory, written under a staging name
   and renamed once whole); a run restarted before its first checkpoint loads it and goes on from
   the next chunk, provided it is the same warm start (items, chunk, world size, encoder weights),
   else it starts over. A run resumed from a training checkpoint takes the bank from there and
   deletes the warm-start directory.

`reencode_bank` re-encodes the whole bank the same way (each rank its own written rows, locally)
during training (`model.lemur.reencode_every`) and before evaluation (`reencode_before_eval`).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from tqdm import tqdm

from muse_rec.config import Config, DataConfig
from muse_rec.data import schema
from muse_rec.data.atomic import write_json
from muse_rec.data.checks import dense_list, open_parquet
from muse_rec.data.feature_map import FeatureMaps, IdMap
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import list_row_groups, read_chunks
from muse_rec.distributed.memory_bank import BANK_WEIGHT_SUFFIX
from muse_rec.model.lemur import TargetEncoding

log = logging.getLogger(__name__)

DIRECTORY = "warm_start"
META = "meta.json"


def items_read(
    layout: DatasetLayout, items: IdMap, long_len: int, rank: int = 0, world_size: int = 1, decode_rows: int = DataConfig.decode_rows
) -> np.ndarray:
    """(items.num_rows,) bool: the item rows this rank's share of the train split reads (row groups
    rank, rank + world_size, ...): the last `long_len` items of each history and the targets. A
    history repeated on consecutive rows (a user's impressions) is read once per chunk of
    `decode_rows` rows, streamed as the loader streams them (`muse_rec.data.loader.read_chunks`)."""
    seen = np.zeros(items.num_rows, bool)
    groups = list_row_groups(layout, "train")[rank::world_size]
    chunks = (chunk for group in groups for chunk in read_chunks(open_parquet(group.path), group, decode_rows, [schema.HIST_ITEMS, schema.TARGET_ITEM]))
    for table in chunks:
        history = dense_list(table.column(schema.HIST_ITEMS).combine_chunks())
        values = history.values.to_numpy(zero_copy_only=False)
        offsets = history.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        first = _first_of_repeats(values, offsets)
        kept = np.repeat(first, lengths)
        position = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
        kept &= position >= np.repeat(lengths - long_len, lengths)  # the last long_len of each history
        seen[items.remap(np.unique(values[kept]))] = True
        seen[items.remap(table.column(schema.TARGET_ITEM).fill_null(0).to_numpy())] = True
    seen[0] = False  # padding / out of vocabulary
    return seen


def calibration_rows(layout: DatasetLayout, items: IdMap, count: int) -> np.ndarray:
    """Up to `count` item rows of train targets, as training meets them (popular items as often as
    they come: the running mean the centring then keeps is over targets too): the first row groups'."""
    out: list[np.ndarray] = []
    for group in list_row_groups(layout, "train"):
        table = open_parquet(group.path).read_row_group(group.index, columns=[schema.TARGET_ITEM], use_threads=False)
        rows = items.remap(table.column(schema.TARGET_ITEM).fill_null(0).to_numpy())
        out.append(rows[rows != 0])
        if sum(map(len, out)) >= count:
            break
    return np.concatenate(out)[:count] if out else np.zeros(0, np.int64)


def _first_of_repeats(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(rows,) bool: False for a row whose list equals the previous row's (same length, same items)."""
    lengths = np.diff(offsets)
    candidate = np.zeros(len(lengths), bool)
    candidate[1:] = (lengths[1:] == lengths[:-1]) & (lengths[1:] > 0)
    rows = np.flatnonzero(candidate)
    if not rows.size:
        return ~candidate
    size = lengths[rows]
    step = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
    here = np.repeat(offsets[rows], size) + step
    before = np.repeat(offsets[rows - 1], size) + step
    equal = np.logical_and.reduceat(values[here] == values[before], np.cumsum(size) - size)
    first = np.ones(len(lengths), bool)
    first[rows[equal]] = False
    return first


def warm_start_bank(model: nn.Module, config: Config, maps: FeatureMaps, out: Path, start_step: int, progress: bool = True) -> dict:
    """Fill lemur's bank before step `start_step` == 0 (module doc); collective. Returns the record
    for metrics.jsonl ({} for other methods, warm_start none, or a resumed run)."""
    found = [m for m in model.modules() if isinstance(m, TargetEncoding)]
    lemur = config.model.lemur
    if not found or lemur.warm_start == "none":
        return {}
    targets = found[0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    directory = Path(out) / DIRECTORY
    if start_step > 0 or not config.train.resume:  # the bank comes from the checkpoint / a fresh run starts over
        if rank == 0:
            _remove(directory)
        _barrier()
        if start_step > 0:
            return {}
    start = time.perf_counter()
    chunk = lemur.warm_start_chunk
    item_map = maps.of_column(schema.TARGET_ITEM)
    if lemur.warm_start == "train_items":
        read = items_read(DatasetLayout(config.data.root), item_map, config.data.long_seq_len, rank, world, config.data.decode_rows)
        chosen = _merge(read)
    else:
        chosen = np.ones(item_map.num_rows, bool)
        chosen[0] = False
    scan_seconds = time.perf_counter() - start
    if lemur.content_input == "scl" and targets.content_source is None:
        targets.set_content_source(scl_content_source(maps))
    writer = targets.writer
    device = targets.steps.device
    sample = calibration_rows(DatasetLayout(config.data.root), item_map, chunk)  # the same on every rank
    calibrated = targets.calibrate_centring(torch.from_numpy(sample).to(device))
    mine_rows = [lo + np.flatnonzero(chosen[lo:hi]) for lo, hi in writer.held_ranges]
    mine = torch.from_numpy(np.concatenate(mine_rows) if mine_rows else np.zeros(0, np.int64)).to(device)
    rounds = _max_over_ranks(math.ceil(mine.numel() / chunk))
    total = int(chosen.sum())
    identity = {"warm_start": lemur.warm_start, "items": total, "chunk": chunk, "rounds": rounds, "world_size": world,
                "encoder": _fingerprint(targets.encoder)}
    done = _load_progress(model, directory, identity)
    if rank == 0:
        log.info("lemur warm start: %s items to encode (%.1f%% of the item table), %d chunks of %d per rank; scan %.1f s%s",
                 f"{total:,}", 100 * total / max(item_map.num_rows - 1, 1), rounds, chunk, scan_seconds,
                 f"; resuming after chunk {done}" if done else "")
    encode_start = time.perf_counter()
    save_seconds = 0.0
    encoded = 0
    bar = tqdm(range(done, rounds), initial=done, total=rounds, desc="warm start", unit="chunk", disable=not progress or rank != 0)
    for round_ in bar:
        rows = mine[round_ * chunk : (round_ + 1) * chunk]
        if rows.numel():
            writer.store_local(rows, targets.encode_for_bank(rows), only_written=False)
            encoded += rows.numel()
        finished = round_ + 1
        if finished == rounds or (lemur.warm_start_save_every and finished % lemur.warm_start_save_every == 0):
            saving = time.perf_counter()
            _save_progress(model, directory, {**identity, "done": finished})
            save_seconds += time.perf_counter() - saving
    encode_seconds = time.perf_counter() - encode_start - save_seconds
    encoded = _sum_over_ranks(encoded)
    record = {
        "warm_start_items": total,
        "warm_start_item_table_share": total / max(item_map.num_rows - 1, 1),
        "warm_start_encoded_now": encoded,
        "warm_start_resumed_after_chunk": done,
        "warm_start_scan_seconds": round(scan_seconds, 3),
        "warm_start_encode_seconds": round(encode_seconds, 3),
        "warm_start_save_seconds": round(save_seconds, 3),
        "warm_start_items_per_second": encoded / encode_seconds if encode_seconds > 0 and encoded else None,
        "warm_start_calibrated_centring": calibrated,
    }
    if rank == 0:
        rate = record["warm_start_items_per_second"]
        log.info("lemur warm start done: %s items encoded now in %.1f s (%s items/s over %d rank(s)), scan %.1f s, saves %.1f s",
                 f"{encoded:,}", encode_seconds, f"{rate:,.0f}" if rate else "-", world, scan_seconds, save_seconds)
    return record


def reencode_bank(model: nn.Module) -> dict:
    """Every written bank row re-encoded by the current encoder (`TargetEncoding.reencode_held`: each
    rank its own rows, locally, without gradient); collective. Returns the record for metrics.jsonl:
    rows re-encoded, the bank's staleness just before (mean cosine between the new and the cached
    values) and the seconds taken (the slowest rank's); {} for other methods."""
    found = [m for m in model.modules() if isinstance(m, TargetEncoding)]
    if not found:
        return {}
    start = time.perf_counter()
    staleness = found[0].reencode_held()
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=staleness.device)
    if dist.is_initialized():
        dist.all_reduce(staleness)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    total, count = staleness.tolist()
    return {"bank_reencoded_rows": int(count), "bank_staleness_before_reencode": total / count if count else None,
            "bank_reencode_seconds": round(float(seconds), 3)}


def scl_content_source(maps: FeatureMaps):
    """content_input=scl: item rows -> (N, 128) float SCL values (zeros where an item has none, and
    for row 0), gathered from the memory-mapped values file on the host."""
    keys = maps.of_column(schema.TARGET_ITEM).keys

    def content(rows: torch.Tensor) -> torch.Tensor:
        item_rows = rows.cpu().numpy()
        raw = np.where(item_rows > 0, keys[np.maximum(item_rows - 1, 0)], 0)
        scl_rows = maps.scl_of_items(raw, item_rows)
        out = np.zeros((len(item_rows), schema.SCL_DIM), np.float32)
        has = scl_rows > 0
        out[has] = maps.scl.values[scl_rows[has] - 1]
        return torch.from_numpy(out).to(rows.device)

    return content


def _merge(local: np.ndarray) -> np.ndarray:
    """The union over ranks of a bool array (an all-reduce of one byte per entry)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    tensor = torch.from_numpy(local.astype(np.uint8)).to(_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().numpy().astype(bool)


def _max_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def _sum_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(tensor)
    return int(tensor)


def _device() -> torch.device:
    """NCCL moves CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fingerprint(encoder: nn.Module) -> float:
    """A checksum of the encoder's weights: a saved warm start is only continued with the same encoder."""
    return float(sum(t.detach().double().sum().cpu() for t in encoder.state_dict().values() if t.is_floating_point()))


def _bank_state(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.endswith(BANK_WEIGHT_SUFFIX)}


def _load_progress(model: nn.Module, directory: Path, identity: dict) -> int:
    """Chunks done by a saved warm start of this very kind (its bank loaded in place), else 0."""
    for path in (directory, _aside(directory)):
        meta_path = path / META
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in identity} != identity:
            log.warning("%s: a warm start of another kind (%s; this run: %s); starting over", path,
                        {k: meta.get(k) for k in identity}, identity)
            return 0
        dcp.load({"bank": _bank_state(model)}, checkpoint_id=path)
        return int(meta["done"])
    return 0


def _save_progress(model: nn.Module, directory: Path, meta: dict) -> None:
    """Collective: the bank so far and the chunks done, replacing the previous save once complete."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    staging = directory.with_name(f".{directory.name}.partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    dcp.save({"bank": _bank_state(model)}, checkpoint_id=staging)
    _barrier()
    if rank == 0:
        write_json(staging / META, meta)  # last: a directory with meta.json is complete
        aside = _aside(directory)
        if directory.exists():
            _remove(aside)
            directory.rename(aside)
        staging.rename(directory)
        _remove(aside)
    _barrier()


def _aside(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _remove(path: Path) -> None:
    """meta.json first: a deletion cut short leaves nothing that looks complete."""
    (path / META).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    for other in (path.with_name(f".{path.name}.partial"), _aside(path)):
        if other.exists() and other != path:
            (other / META).unlink(missing_ok=True)
            shutil.rmtree(other, ignore_errors=True)
