"""Streaming reader of joined shards: parquet row groups -> `Batch`, split over ranks and workers.

Work split. The rows of a split (all shards, in file order) are cut into `world_size` contiguous
ranges that differ by at most one row. Every rank runs the same number of steps with the same
batch size at each step: where a rank's rows run out one row early, its last batch is filled up
with a copy of its last row at weight 0. Nothing is dropped, and each split is logged with what
was padded. Within a rank, the batches are cut into one contiguous block per DataLoader worker
(each worker reads its own row groups), and the batches are yielded round-robin over the
workers: `batch_order` gives that order, so a resumed run (`start_step`) continues exactly.

Decoding. Each row group is streamed once with pyarrow, `data.decode_rows` rows at a time, and
each chunk is handled as whole columns: list columns through their offsets/values arrays, never
row by row. Rows are denormalised (each impression of a user repeats the user's 1000-long
sequence), so runs of consecutive rows holding the same sequence are found first (same user,
same length, equal contents) and each distinct sequence is truncated, remapped and left-padded
once. A null ID reads as 0 ('missing') and a null list as an empty sequence, exactly as `prepare`
writes them. `decode_reference` is the plain per-row definition of the same output, and the tests
hold the two equal.

Assembly. A batch is laid out as the model reads it (`muse_rec.batch.BatchLayout`). At
`model.gsu_stage: loader` the GSU runs here (`muse_rec.data.gsu`): the SCL cosines of each
distinct history against all of its targets, from the memory-mapped values file, then muse's
top-K or sim_hard's newest category matches; the batch holds only the rows the loss uses.

Opening a split checks that its metadata.json exists and that its total_rows equals the rows in
the parquet footers, so an interrupted or mixed write is refused instead of read in part.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from muse_rec.batch import DISTINCT_ROW_FEATURES, HISTORY_FEATURES, ID_FEATURES, TARGET_FEATURES, Batch, BatchLayout
from muse_rec.config import DataConfig
from muse_rec.data import gsu, schema
from muse_rec.data.checks import check_aligned, check_columns, check_total_rows, clicks_from_labels, dense_list, open_parquet
from muse_rec.data.cooccurrence import cooccurring_pairs, same_category_negatives
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.errors import DataError

log = logging.getLogger(__name__)


# -- planning: which rows each rank and worker reads ---------------------------------------------
@dataclass(frozen=True)
class RowGroup:
    path: Path
    index: int  # row group index inside the file
    first_row: int  # position of its first row in the whole split
    num_rows: int


@dataclass(frozen=True)
class BatchSpec:
    """Rows [start, stop) of the split, then `padding` weight-0 copies of row stop - 1."""

    start: int
    stop: int
    padding: int = 0


@dataclass(frozen=True)
class RankPlan:
    row_groups: tuple[RowGroup, ...]
    total_rows: int
    rows: tuple[int, int]  # this rank's [start, stop)
    batches: tuple[BatchSpec, ...]  # the same count and sizes on every rank


def list_row_groups(layout: DatasetLayout, split: str) -> tuple[RowGroup, ...]:
    """Every row group of the split, from the parquet footers (no data is read).

    The footers must hold the rows metadata.json promises: a split without one is incomplete (a
    killed prepare or synth), and one whose count differs mixes shards of different runs.
    """
    paths = layout.shards(split)
    if not paths:
        raise _no_shards(layout, split)
    groups, first_row = [], 0
    for path in paths:
        meta = open_parquet(path).metadata
        check_columns(path, meta.schema.to_arrow_schema(), schema.JOINED_SCHEMA)
        for index in range(meta.num_row_groups):
            num_rows = meta.row_group(index).num_rows
            groups.append(RowGroup(path, index, first_row, num_rows))
            first_row += num_rows
    check_total_rows(layout, split, first_row, len(paths))
    if not first_row:
        raise DataError(f"{layout.split_dir(split)}: the {len(paths)} shard file(s) hold no rows (expected at least one row)")
    return tuple(groups)


def _no_shards(layout: DatasetLayout, split: str) -> DataError:
    """The error for a split without shard files; an empty or missing data directory is named as such."""
    advice = "fetch a data set with `muse-rec download`, build one with `muse-rec prepare` or `muse-rec synth`"
    if not layout.root.is_dir():
        return DataError(f"{layout.root}: data directory missing; {advice}")
    if not any(layout.root.iterdir()):
        return DataError(f"{layout.root}: empty data directory ({split}/ and feature_map/ are missing); {advice}")
    return DataError(
        f"{layout.split_dir(split)}: no shards found (expected {split}-shard-NNNNNN.parquet files); {advice}"
    )


def plan_rank(row_groups: tuple[RowGroup, ...], batch_size: int, rank: int, world_size: int) -> RankPlan:
    """This rank's contiguous rows and its batches; every rank gets the same steps and sizes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = sum(g.num_rows for g in row_groups)
    if total < world_size:
        where = f"{row_groups[0].path.parent}: " if row_groups else ""
        raise DataError(f"{where}{total} rows in {len(row_groups)} row group(s) cannot give each of {world_size} ranks a row")
    start, stop = total * rank // world_size, total * (rank + 1) // world_size
    most_rows = -(-total // world_size)  # the largest rank's row count
    steps = -(-most_rows // batch_size)
    batches = []
    for step in range(steps):
        size = min(batch_size, most_rows - step * batch_size)  # identical on every rank
        lo = min(start + step * batch_size, stop)
        hi = min(lo + size, stop)
        batches.append(BatchSpec(lo, hi, padding=size - (hi - lo)))
    return RankPlan(row_groups, total, (start, stop), tuple(batches))


def batch_order(num_batches: int, num_workers: int) -> np.ndarray:
    """The order a DataLoader yields batches when worker w owns the w-th contiguous block."""
    blocks = np.array_split(np.arange(num_batches), max(num_workers, 1))
    rounds = max((len(b) for b in blocks), default=0)
    grid = np.full((rounds, len(blocks)), -1)
    for w, block in enumerate(blocks):
        grid[: len(block), w] = block
    order = grid.reshape(-1)
    return order[order >= 0]


# -- decoding: one row group -> remapped, padded arrays -------------------------------------------
_SCALAR_COLUMNS = (*ID_FEATURES, schema.TARGET_ITEM, schema.TARGET_CATE)
_PAIR_STREAM = 0x5C0CC
"""First word of the seed of the co-occurrence pairs' draws (the second: the batch's first row)."""


@dataclass
class DecodedRows:
    """A chunk of rows ready to be sliced into batches. Sequences are stored once per distinct sequence."""

    clicks: np.ndarray  # float32 (n,)
    user_ids: np.ndarray  # int64 (n,), raw 129_1
    scalar_rows: np.ndarray  # int64 (n, len(_SCALAR_COLUMNS)), table rows
    scl_target: np.ndarray  # int64 (n,), SCL-table row of the target item
    sequence_of_row: np.ndarray  # intp (n,), index into the (U, L) arrays below
    items: np.ndarray  # int64 (U, L) item-table rows, left-padded with 0
    cates: np.ndarray  # int64 (U, L) category-table rows
    scl: np.ndarray  # int64 (U, L) SCL-table rows


def _ints(table: pa.Table, column: str) -> np.ndarray:
    """An int64 column as numpy; nulls mean 'missing', which the data set writes as 0."""
    return table.column(column).fill_null(0).to_numpy()


def _lists(table: pa.Table, column: str) -> pa.ListArray:
    return table.column(column).combine_chunks()


def _sequence(table: pa.Table, column: str) -> pa.ListArray:
    """A behaviour column with a null list read as empty and a null ID as 0, as `prepare` writes them."""
    return dense_list(_lists(table, column))


def _sequence_runs(user: np.ndarray, items: pa.ListArray, cates: pa.ListArray) -> np.ndarray:
    """Index of the first row of each run of consecutive rows that hold the same sequence."""
    offsets = items.offsets.to_numpy()
    lengths = np.diff(offsets)
    same = np.zeros(len(user), bool)
    same[1:] = (user[1:] == user[:-1]) & (lengths[1:] == lengths[:-1])
    starts = np.flatnonzero(~same)
    ends = np.append(starts[1:], len(user))
    item_values, cate_values = items.values.to_numpy(), cates.values.to_numpy()
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        a, b, m = offsets[s], offsets[e], lengths[s]
        if not (np.array_equal(item_values[a + m : b], item_values[a : b - m]) and np.array_equal(cate_values[a + m : b], cate_values[a : b - m])):
            same[s + 1 : e] = False  # same user, different sequences: treat every row on its own
    return np.flatnonzero(~same)


def _last_padded(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Source and destination positions that move the last `length` values of each given row into
    a flat (len(rows), length) matrix, right-aligned (left-padded)."""
    ends = offsets[rows + 1]
    kept = np.minimum(ends - offsets[rows], length)
    before = np.cumsum(kept) - kept
    step = np.arange(kept.sum())
    src = step + np.repeat(ends - kept - before, kept)
    dst = step + np.repeat(np.arange(len(rows)) * length + length - kept - before, kept)
    return src, dst


def decode_rows(table: pa.Table, maps: FeatureMaps, long_len: int, where: str, first_row: int = 0) -> DecodedRows:
    """Remap, truncate and pad a chunk of rows (see the module doc); errors name a row as
    `first_row` (the chunk's first row in `where`) + its index in the chunk."""
    items, cates = _sequence(table, schema.HIST_ITEMS), _sequence(table, schema.HIST_CATES)
    check_aligned(items, cates, where, first_row)
    clicks = clicks_from_labels(_lists(table, schema.LABEL), where, first_row)
    user = _ints(table, schema.USER)
    scalar_rows = np.stack([maps.of_column(c).remap(_ints(table, c)) for c in _SCALAR_COLUMNS], axis=1)

    run_starts = _sequence_runs(user, items, cates)
    run_start = np.zeros(len(user), bool)
    run_start[run_starts] = True
    sequence_of_row = np.cumsum(run_start) - 1
    src, dst = _last_padded(items.values.to_numpy(), items.offsets.to_numpy(), run_starts, long_len)
    raw_items = items.values.to_numpy()[src]
    item_rows = maps.of_column(schema.HIST_ITEMS).remap(raw_items)
    padded = []
    for rows in (item_rows, maps.of_column(schema.HIST_CATES).remap(cates.values.to_numpy()[src]), maps.scl_of_items(raw_items, item_rows)):
        out = np.zeros(len(run_starts) * long_len, np.int64)
        out[dst] = rows
        padded.append(out.reshape(len(run_starts), long_len))
    scl_target = maps.scl.remap(_ints(table, schema.TARGET_ITEM))
    return DecodedRows(clicks, user, scalar_rows, scl_target, sequence_of_row, *padded)


def decode_reference(table: pa.Table, maps: FeatureMaps, long_len: int) -> DecodedRows:
    """Row-by-row definition of `decode_rows` (no run detection, plain lists): for tests."""
    rows = table.to_pylist()
    n = len(rows)

    def padded(values: list[int | None]) -> list[int]:
        last = [0 if v is None else v for v in values[-long_len:]] if values else []
        return [0] * (long_len - len(last)) + last

    def remap(index, values) -> np.ndarray:
        return index.remap(np.array(values, dtype=np.int64).reshape(n, -1) if n else np.zeros((0, long_len), np.int64))

    items = [padded(r[schema.HIST_ITEMS] or []) for r in rows]
    cates = [padded(r[schema.HIST_CATES] or []) for r in rows]
    return DecodedRows(
        clicks=np.array([r[schema.LABEL][1] for r in rows], np.float32),
        user_ids=np.array([r[schema.USER] or 0 for r in rows], np.int64),
        scalar_rows=np.stack([maps.of_column(c).remap(np.array([r[c] or 0 for r in rows], np.int64)) for c in _SCALAR_COLUMNS], axis=1),
        scl_target=maps.scl.remap(np.array([r[schema.TARGET_ITEM] or 0 for r in rows], np.int64)),
        sequence_of_row=np.arange(n),
        items=remap(maps.of_column(schema.HIST_ITEMS), items),
        cates=remap(maps.of_column(schema.HIST_CATES), cates),
        scl=remap(maps.scl, items),
    )


# -- batches ---------------------------------------------------------------------------------------
def _kjt(values: np.ndarray | torch.Tensor, lengths: dict[str, np.ndarray]) -> KeyedJaggedTensor:
    """A KJT of the given per-row lengths (B each), key-major values."""
    return KeyedJaggedTensor(
        keys=list(lengths),
        values=torch.as_tensor(values),
        lengths=torch.from_numpy(np.concatenate(list(lengths.values())).astype(np.int32)),
    )


def _int64_buffer(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """A tensor to fill through its numpy view. In a DataLoader worker it is allocated in shared
    memory, so handing the batch to the training process copies nothing (25 MB a batch)."""
    tensor = torch.empty(size, dtype=torch.int64)
    if get_worker_info() is not None:
        tensor.share_memory_()
    return tensor, tensor.numpy()


def _features(lengths: dict[str, int], size: int, histories: int) -> tuple[torch.Tensor, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One KJT's values buffer, a (rows, length) numpy view of it per feature (key-major, as KJT
    values are) and each feature's per-row lengths: `size` rows, a history feature's first
    `histories` rows only (the batch's distinct histories; `muse_rec.batch`)."""
    rows = {key: histories if key in HISTORY_FEATURES else size for key in lengths}
    tensor, values = _int64_buffer(sum(rows[key] * length for key, length in lengths.items()))
    views, row_lengths, at = {}, {}, 0
    for key, length in lengths.items():
        views[key], at = values[at : at + rows[key] * length].reshape(rows[key], length), at + rows[key] * length
        row_lengths[key] = np.zeros(size, np.int64)
        row_lengths[key][: rows[key]] = length
    return tensor, views, row_lengths


def assemble_batch(
    pieces: list[tuple[DecodedRows, np.ndarray]],
    weights: np.ndarray,
    long_len: int,
    layout: BatchLayout = BatchLayout(),
    scl_values: np.ndarray | None = None,
    seed: int = 0,
) -> Batch:
    """Gather rows (pieces of decoded row groups, in order) into one `Batch` laid out as `layout`.
    What depends on the history alone (`muse_rec.batch.HISTORY_FEATURES`: the whole long sequence,
    or the last S positions at gsu_stage loader) is carried once per distinct history of the batch.
    Where the layout carries SCL cosines (gsu_stage loader), the GSU runs here on `scl_values`,
    the memory-mapped int8 values file (`muse_rec.data.gsu`); so do lemur's co-occurrence pairs
    (`muse_rec.data.cooccurrence`), drawn from `seed` (the batch's first row: the same pairs
    whatever the workers, and on resume)."""
    if layout.cooccurrence_pairs and scl_values is None:
        raise ValueError("a batch layout with co-occurrence pairs needs the SCL values")
    rng = np.random.default_rng([_PAIR_STREAM, seed]) if layout.cooccurrence_pairs else None
    pairs = [np.zeros((0, 3 + layout.cooccurrence_negatives), np.int64)]
    size = sum(len(rows) for _, rows in pieces)
    # each piece's distinct decoded sequences, and each row's index among them
    distinct = [np.unique(decoded.sequence_of_row[rows], return_inverse=True) for decoded, rows in pieces]
    histories = sum(len(d) for d, _ in distinct)
    sequence_tensor, features, sequence_lengths = _features(layout.sequence_lengths(long_len), size, histories)
    scl_tensor, scl_features, scl_lengths = _features(layout.scl_lengths(long_len), size, histories)
    top_width = {"all": long_len, "none": 0}.get(layout.long, layout.keep_top) if layout.cosines else 0
    top_cosines = np.zeros((size, top_width), np.float32)
    short_cosines = np.zeros((size, layout.short_seq_len if layout.cosines else 0), np.float32)
    scalar_rows = np.empty((len(_SCALAR_COLUMNS), size), np.int64)
    clicks, user_ids = np.empty(size, np.float32), np.empty(size, np.int64)
    history_of_row = np.empty(size, np.int64)
    history_features = {key: f for key, f in (features | scl_features).items() if key in HISTORY_FEATURES}
    at = first_history = 0
    for (decoded, rows), (sequences, history) in zip(pieces, distinct):
        part, history_part = slice(at, at + len(rows)), slice(first_history, first_history + len(sequences))
        scalar_rows[:, part] = decoded.scalar_rows[rows].T
        clicks[part], user_ids[part] = decoded.clicks[rows], decoded.user_ids[rows]
        if schema.SCL_TARGET in scl_features:
            scl_features[schema.SCL_TARGET][part, 0] = decoded.scl_target[rows]
        history_of_row[part] = first_history + history
        for key, source in _history_sources(decoded, layout.short_seq_len):
            if key in history_features:
                np.take(source, sequences, axis=0, out=history_features[key][history_part])
        per_row = {key: f[part] for key, f in features.items() if key not in HISTORY_FEATURES}
        _fill_sequences(decoded, rows, layout, scl_values, per_row, top_cosines[part], short_cosines[part])
        if rng is not None:
            scl, items = decoded.scl[sequences], decoded.items[sequences]
            anchors, positives, history, places = cooccurring_pairs(
                scl_values, scl, items, layout.cooccurrence_pairs, layout.cooccurrence_min_cosine, rng
            )
            negatives = same_category_negatives(
                scl_values, scl, items, decoded.cates[sequences], places, layout.cooccurrence_negatives,
                layout.cooccurrence_negative_max_cosine, rng,
            )
            negatives = np.where(negatives >= 0, negatives + first_history * items.shape[1], -1)
            pairs.append(np.concatenate([np.stack([anchors, positives, first_history + history], axis=1), negatives], axis=1))
        at, first_history = at + len(rows), first_history + len(sequences)
    top_cells = {key: features[key] for key in DISTINCT_ROW_FEATURES if key in features}
    if top_cells:
        sequence_tensor, top_cells = _distinct_rows(features, sequence_lengths, top_cells)
    return Batch(
        id_features=_kjt(scalar_rows[: len(ID_FEATURES)].reshape(-1), {key: np.ones(size, np.int64) for key in ID_FEATURES}),
        sequence_features=_kjt(sequence_tensor, sequence_lengths),
        scl_features=_kjt(scl_tensor, scl_lengths) if scl_lengths else None,
        labels=torch.from_numpy(clicks * (weights > 0)),
        weights=torch.from_numpy(weights),
        user_ids=torch.from_numpy(user_ids),
        top_cosines=torch.from_numpy(top_cosines),
        short_cosines=torch.from_numpy(short_cosines),
        history_of_row=torch.from_numpy(history_of_row),
        num_histories=histories,
        top_cells=top_cells,
        cooccurrence=torch.from_numpy(np.concatenate(pairs)),
    )


def _distinct_rows(
    views: dict[str, np.ndarray], lengths: dict[str, np.ndarray], cells: dict[str, np.ndarray]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A new values buffer for the KJT of `views` in which each feature of `cells` (B, K rows) holds
    its distinct rows, all in the first sample's slot (`lengths` is updated), and the index of
    each cell among them (`muse_rec.batch`, distinct rows). torch.unique sorts: about 1.5 ms for
    50,000 cells, against np.unique's 3.5."""
    parts, indices = [], {}
    for key, view in views.items():
        if key in cells:
            distinct, indices[key] = torch.unique(torch.from_numpy(cells[key]), return_inverse=True)
            lengths[key][:] = 0
            lengths[key][0] = len(distinct)
            parts.append(distinct)
        else:
            parts.append(torch.from_numpy(view).reshape(-1))
    tensor, _ = _int64_buffer(sum(len(part) for part in parts))
    torch.cat(parts, out=tensor)
    return tensor, indices


def _history_sources(decoded: DecodedRows, short_len: int) -> tuple[tuple[str, np.ndarray], ...]:
    """Each history feature with the decoded sequences (one row per distinct sequence) it reads."""
    short = slice(decoded.items.shape[1] - short_len, None)
    return (
        (schema.HIST_ITEMS, decoded.items), (schema.HIST_CATES, decoded.cates), (schema.SCL_LONG, decoded.scl),
        (schema.SHORT_ITEMS, decoded.items[:, short]), (schema.SHORT_CATES, decoded.cates[:, short]),
    )


_TARGET_COLUMNS = {key: _SCALAR_COLUMNS.index(key) for key in TARGET_FEATURES}


def _fill_sequences(
    decoded: DecodedRows,
    rows: np.ndarray,
    layout: BatchLayout,
    scl_values: np.ndarray | None,
    out: dict[str, np.ndarray],
    top_cosines: np.ndarray,
    short_cosines: np.ndarray,
) -> None:
    """The per-row sequence features and cosines of some rows of one decoded row group (see
    `BatchLayout`; the distinct histories are `assemble_batch`'s)."""
    sequences = decoded.sequence_of_row[rows]
    for key, column in _TARGET_COLUMNS.items():
        out[key][:, 0] = decoded.scalar_rows[rows, column]
    if not layout.cosines:
        return
    if scl_values is None:
        raise ValueError("a batch layout with SCL cosines needs the SCL values")
    length = decoded.items.shape[1]
    short = slice(length - layout.short_seq_len, None)
    window = short if layout.long == "none" else slice(None)  # din: nothing of the long sequence
    positions, valid, at = None, None, None
    if layout.long == "sim_hard":  # kept by category: cosines only at the kept and the recent positions
        target_cates = decoded.scalar_rows[rows, _TARGET_COLUMNS[schema.TARGET_CATE]]
        positions, valid = gsu.newest_matches(np.take(decoded.cates, sequences, axis=0), target_cates, layout.keep_top)
        at = np.concatenate([positions, np.broadcast_to(np.arange(length)[short], (len(rows), layout.short_seq_len))], axis=1)
    cosines = gsu.scl_cosines(scl_values, decoded.scl_target[rows], decoded.scl[:, window], sequences, at)
    short_cosines[:] = cosines[:, -layout.short_seq_len :]
    if layout.long == "all":  # sim_soft: its top-K needs the trained embeddings of every position
        top_cosines[:] = cosines
        return
    if layout.long == "none":
        return
    if layout.long == "muse":
        positions = gsu.top_k(cosines, layout.keep_top)
        top_cosines[:] = cosines.ravel()[np.arange(0, cosines.size, length)[:, None] + positions]
    else:
        top_cosines[:] = cosines[:, : layout.keep_top]
    flat = sequences[:, None] * length + positions
    out[schema.TOP_ITEMS][:] = decoded.items.reshape(-1)[flat]
    out[schema.TOP_CATES][:] = decoded.cates.reshape(-1)[flat]
    if valid is not None:  # sim_hard: slots past the match count read as item, category, SCL key 0
        for kept in (out[schema.TOP_ITEMS], out[schema.TOP_CATES], top_cosines):
            kept *= valid


class ShardDataset(IterableDataset):
    """Batches of one split for one rank; with DataLoader workers, each reads its own block."""

    def __init__(
        self,
        config: DataConfig,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        maps: FeatureMaps | None = None,
        start_step: int = 0,
        layout: BatchLayout | None = None,
    ) -> None:
        """`layout`: what the batches carry, `muse_rec.batch.batch_layout` of the model config
        (default: the whole sequence and its SCL keys, `model.gsu_stage: model`)."""
        if config.long_seq_len < 1:
            raise DataError(f"data.long_seq_len must be positive, got {config.long_seq_len}")
        files = DatasetLayout(config.root)
        self.config, self.split = config, split
        row_groups = list_row_groups(files, split)  # first: an empty directory is named as such, not by a missing map
        self.maps = maps or FeatureMaps.load(files, config.vocab, strict=config.strict)
        self.plan = plan_rank(row_groups, config.batch_size, rank, world_size)
        if not 0 <= start_step <= len(self.plan.batches):
            raise ValueError(f"start_step {start_step} is outside 0..{len(self.plan.batches)}")
        self.start_step = start_step
        self.layout = layout or BatchLayout()
        self._log_plan(rank, world_size)

    def _log_plan(self, rank: int, world_size: int) -> None:
        batches, (start, stop) = self.plan.batches, self.plan.rows
        padding = sum(b.padding for b in batches)
        log.info(
            "%s: %d rows in %d row groups -> %d rank(s) x %d steps of up to %d; rank %d reads rows [%d, %d)%s; nothing is left out",
            self.split, self.plan.total_rows, len(self.plan.row_groups), world_size, len(batches),
            self.config.batch_size, rank, start, stop,
            f" and pads its last batch with {padding} weight-0 row(s) so all ranks step together" if padding else "",
        )

    def __len__(self) -> int:
        return len(self.plan.batches) - self.start_step

    def worker_batches(self, worker: int, num_workers: int) -> np.ndarray:
        """Batch indices this worker yields, in order; DataLoader's round-robin interleaves them."""
        remaining = batch_order(len(self.plan.batches), num_workers)[self.start_step :]
        return remaining[worker::max(num_workers, 1)]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        reader = _ChunkReader(self.plan.row_groups, self.maps, self.config.long_seq_len, self.config.decode_rows)
        for index in self.worker_batches(worker, num_workers):
            spec = self.plan.batches[index]
            pieces = reader.pieces(spec.start, spec.stop) if spec.stop > spec.start else []
            if spec.padding:
                ((decoded, (last,)),) = reader.pieces(spec.stop - 1, spec.stop)
                pieces.append((decoded, np.full(spec.padding, last)))
            weights = np.ones(spec.stop - spec.start + spec.padding, np.float32)
            weights[spec.stop - spec.start :] = 0.0
            yield assemble_batch(pieces, weights, self.config.long_seq_len, self.layout, self.maps.scl.values, seed=spec.start)


def read_chunks(
    file: pq.ParquetFile, group: RowGroup, rows: int, columns: list[str] = schema.JOINED_SCHEMA.names
) -> Iterator[pa.Table]:
    """The rows of one row group in order, `rows` at a time (pyarrow's streaming reader). A whole
    row group at once allocates all of its columns afresh, whose pages the kernel zeroes: 0.35-2.7 s
    of system time for 10,000 rows of two 1000-long sequences, against 0.14 s streamed 1024 at a time."""
    where = f"{group.path}, row group {group.index}"
    chunks = file.iter_batches(batch_size=rows, row_groups=[group.index], columns=columns, use_threads=False)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where}: cannot be read (corrupt or truncated file?): {e}") from None
        yield pa.Table.from_batches([chunk])


def slice_pieces(chunks: list[tuple[int, DecodedRows]], start: int, stop: int) -> list[tuple[DecodedRows, np.ndarray]]:
    """Rows [start, stop) of the split as (chunk, its row indices) pieces, from decoded chunks given
    with the split position of their first row, in order and covering those rows."""
    pieces = []
    for first, decoded in chunks:
        lo, hi = max(start, first), min(stop, first + len(decoded.clicks))
        if lo < hi:
            pieces.append((decoded, np.arange(lo - first, hi - first)))
    return pieces


class _ChunkReader:
    """Streams each row group `decode_rows` rows at a time (`read_chunks`), decoding each chunk once
    and keeping the chunks a batch may still need: a step never waits for a whole row group. A
    request behind the stream (a resumed run, a worker's first batch) restarts it at the row
    group's start, without decoding the chunks before the rows asked for."""

    def __init__(self, row_groups: tuple[RowGroup, ...], maps: FeatureMaps, long_len: int, decode_rows: int) -> None:
        self.row_groups, self.maps, self.long_len, self.decode_rows = row_groups, maps, long_len, decode_rows
        self._firsts = np.array([g.first_row for g in row_groups])
        self._chunks: list[tuple[int, DecodedRows]] = []  # (split position of the first row, chunk), in order
        self._stream: tuple[int, int, Iterator[pa.Table]] | None = None  # (row group, split position of its next row, chunks)
        self._files: dict[Path, pq.ParquetFile] = {}

    def pieces(self, start: int, stop: int) -> list[tuple[DecodedRows, np.ndarray]]:
        self._chunks = [(first, c) for first, c in self._chunks if first + len(c.clicks) > start]
        row = start
        while row < stop:
            held = [first + len(c.clicks) for first, c in self._chunks if first <= row < first + len(c.clicks)]
            row = held[0] if held else self._decode_chunk_at(row)
        return slice_pieces(sorted(self._chunks, key=lambda chunk: chunk[0]), start, stop)

    def _decode_chunk_at(self, row: int) -> int:
        """Decode the chunk holding split row `row`; the split position after it."""
        index = int(np.searchsorted(self._firsts, row, side="right")) - 1
        group = self.row_groups[index]
        if self._stream is None or self._stream[0] != index or self._stream[1] > row:
            if group.path not in self._files:
                self._files = {group.path: open_parquet(group.path)}  # one open file at a time
            self._stream = (index, group.first_row, read_chunks(self._files[group.path], group, self.decode_rows))
        _, first, tables = self._stream
        while True:
            table = next(tables, None)
            if table is None:
                raise DataError(f"{group.path}, row group {group.index}: ends before row {row - group.first_row} of the {group.num_rows} its footer promises")
            self._stream = (index, first + table.num_rows, tables)
            if row < first + table.num_rows:
                where = f"{group.path}, row group {group.index}"
                self._chunks.append((first, decode_rows(table, self.maps, self.long_len, where, first - group.first_row)))
                return first + table.num_rows
            first += table.num_rows  # before the rows asked for: read, not decoded


def make_dataloader(dataset: ShardDataset, num_workers: int | None = None, pin_memory: bool = False) -> Iterable[Batch]:
    """A DataLoader over ready-made batches (batching happens in the dataset); read ahead by a
    thread (`ReadAhead`) with `data.read_ahead` and no worker processes."""
    workers = dataset.config.num_workers if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, persistent_workers=False)
    return ReadAhead(loader, dataset.config.read_ahead) if dataset.config.read_ahead and not workers else loader


class ReadAhead:
    """The batches of `batches`, read up to `depth` ahead by a background thread of this process.

    Why: a DataLoader worker hands each batch over in fresh shared memory, whose pages the kernel
    zeroes every time; on a 2-core machine the workers used 150-215 ms of CPU per 1000 samples
    against 98 ms read in the training process (README, issue 11). Parquet decoding, numpy and
    torch release the GIL for their heavy parts, so the thread's work runs beside the step. The
    order is the dataset's own; an error in the thread is raised in the consumer, after the batches
    before it; leaving the loop early stops the thread."""

    _END = object()

    def __init__(self, batches: Iterable[Batch], depth: int) -> None:
        self.batches, self.depth = batches, depth

    def __iter__(self) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def hand_over(item: object) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for batch in self.batches:
                    if not hand_over(batch):
                        return
                hand_over(self._END)
            except BaseException as error:  # raised in the consumer, which sees the batches before it first
                hand_over(error)

        thread = threading.Thread(target=read, name="muse-rec-read-ahead", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not self._END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()
