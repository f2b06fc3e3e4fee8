"""`muse-rec prepare`: rebuild the released data set from the six raw TAOBAO-MM tables.

Into a directory of the released layout (`DatasetLayout`) it writes every sorted feature map (the
full item map and the coverage map, saved under the p90 name whatever the coverage: the coverage is
recorded in metadata.json), the SCL keys and values sorted by key, the train/test joined shards, and
(if the raw folder has `item_content.parquet`, method lemur's item titles) the item content table.
Vocabularies follow `muse_rec.data.vocab`, built from the train user features and the item features.

Join: samples LEFT JOIN user features ON 129_1 LEFT JOIN item features ON 205 (train samples with the
train user table, test samples with the test one). Missing scalars become 0, a missing user gets
empty sequences; the ID 0 means 'missing' and never joins. Of a repeated user or item, the first row
is used (with a warning). Rows come grouped by user, users in user-table order, each user's samples
in sample order; then the samples without a user row, in sample order.

Memory is bounded by the vocabularies and the samples, never by the user tables (~45 GB each):
- user tables are read slice by slice of a row group; the train one once, counted for the
  vocabularies and joined in the same pass;
- a split's samples are held as numpy arrays (~22 bytes a sample) stably sorted by user, so each
  slice of users finds its samples with searchsorted;
- the item table is held as arrays (4 M rows); the SCL values (4.5 GB) are streamed into a
  memory-mapped .npy, each row scattered straight to its sorted position (no staging copy).

Output. A directory holding train/, test/ or feature_map/ that prepare did not write (no output
marker of prepare: a synthetic or downloaded set, or an unmarked one of an earlier muse_rec version)
is refused before anything is deleted unless `force` (`atomic.claim_output_dir`); other entries,
such as a raw/ folder of input tables, are left alone. A run writes everything into a staging
directory inside the output (`.prepare.partial/`) and only when every file is complete swaps its
train/, test/ and feature_map/ in for the old ones (`atomic.staged_swap`: old aside, new in, old
deleted, recorded in a journal that a re-run finishes from). So a run that fails (bad input found
midway, or killed) before the swap leaves an earlier data set as it was, one killed during the swap
leaves the new set for the next run to finish swapping in, and a directory is complete exactly when
both splits have a metadata.json. A re-run needs disk room for both copies until the swap.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from muse_rec.data import schema
from muse_rec.data.atomic import claim_output_dir, mark_output, npy_memmap_writer, save_npy, staged_swap
from muse_rec.data.checks import check_aligned, check_columns, clicks_from_labels, dense_list, open_parquet
from muse_rec.data.content import content_fields
from muse_rec.data.feature_map import IdMap, first_unsorted_position
from muse_rec.data.layout import FEATURE_MAP_DIR, SPLITS, DatasetLayout
from muse_rec.data.shards import ShardWriter, write_table
from muse_rec.data.vocab import coverage_threshold, coverage_vocab, sorted_vocab
from muse_rec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

USER_BATCH_ROWS = 1024  # users per join step: ~11 impressions x 2 lists x 1000 IDs each -> ~180 MB of rows
READ_BATCH_ROWS = 1 << 18  # rows per read of the narrow tables (samples, items, SCL keys)
SCL_BATCH_ROWS = 1 << 16  # SCL vectors per read: 8 MB
MIN_PENDING_IDS = 1 << 22  # partial ID counts held before they are merged

RAW_SCHEMAS = {
    "train_samples": schema.RAW_SAMPLES_SCHEMA,
    "test_samples": schema.RAW_SAMPLES_SCHEMA,
    "train_user_features": schema.RAW_USER_SCHEMA,
    "test_user_features": schema.RAW_USER_SCHEMA,
    "item_features": schema.RAW_ITEM_SCHEMA,
    "scl_embedding_int8_p90": schema.RAW_SCL_SCHEMA,
}
"""The raw tables `prepare` reads (`{name}.parquet` in the raw directory) and the columns each must have."""

_ITEM_ATTRIBUTES = (schema.TARGET_CATE, *schema.ITEM_ATTRS)  # what the item join adds to a row


# -- reading ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stage(name: str, total: int, unit: str, progress: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar for one stage; when it ends, its throughput goes to the log."""
    done = 0
    start = time.perf_counter()
    with tqdm(total=total, desc=name, unit=unit, unit_scale=True, disable=not progress) as bar:

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(n)

        yield advance
    seconds = time.perf_counter() - start
    log.info("%s: %d %ss in %.1f s (%.0f %ss/s)", name, done, unit, seconds, done / max(seconds, 1e-9), unit)


def _ids(column: pa.Array) -> np.ndarray:
    """The int64 IDs of a column (a list column's values, flattened); null reads as 0, 'missing'."""
    if pa.types.is_list(column.type):
        column = column.flatten()
    return pc.fill_null(column, 0).to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class RawTable:
    """One raw parquet file, opened and its columns checked before anything is written."""

    path: Path
    file: pq.ParquetFile

    @classmethod
    def open(cls, path: Path, expected: pa.Schema) -> "RawTable":
        file = open_parquet(path)
        check_columns(path, file.schema_arrow, expected)
        return cls(path, file)

    @property
    def num_rows(self) -> int:
        return self.file.metadata.num_rows

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[tuple[pa.RecordBatch, str]]:
        """Row group by row group, in slices of at most `batch_rows` (a row group can be huge); with
        each slice the `where` of its error messages: file, row group and, for a slice, its rows."""
        for group in range(self.file.num_row_groups):
            group_rows = self.file.metadata.row_group(group).num_rows
            first = 0
            try:
                for batch in self.file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                    span = "" if batch.num_rows == group_rows else f", rows {first}-{first + batch.num_rows - 1} of it"
                    yield batch, f"{self.path}, row group {group}{span}"
                    first += batch.num_rows
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{self.path}, row group {group}: not readable (corrupt or truncated?): {e}") from None

    def read_columns(self, names: list[str], progress: bool) -> dict[str, np.ndarray]:
        """Whole narrow columns as numpy: IDs as int64 (null = 0), the label as checked clicks (int8)."""
        out = {name: np.empty(self.num_rows, np.int8 if name == schema.LABEL else np.int64) for name in names}
        start = 0
        with _stage(f"read {self.path.name}", self.num_rows, "row", progress) as advance:
            for batch, where in self.batches(names, READ_BATCH_ROWS):
                end = start + batch.num_rows
                for name in names:
                    column = batch.column(name)
                    out[name][start:end] = clicks_from_labels(column, where) if name == schema.LABEL else _ids(column)
                start = end
                advance(batch.num_rows)
        return out


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """True where a sorted array holds a value for the first time."""
    first = np.ones(len(sorted_values), bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    return first


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Row of each distinct non-zero key, in ascending key order; of a repeated key its first row."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    return order[_run_starts(sorted_keys) & (sorted_keys != 0)]


# -- vocabularies ----------------------------------------------------------------------------------
class IdCounter:
    """Distinct non-zero IDs and how often each occurs, in memory of the order of the distinct IDs.

    Each added array is reduced to (unique, counts) at once; the partial results are merged when
    they outgrow the merged ones, so the total merge work stays O(n log n).
    """

    def __init__(self, min_pending: int = MIN_PENDING_IDS) -> None:
        self.min_pending = min_pending
        self._ids: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._merged = 0
        self._pending = 0

    def add(self, ids: np.ndarray) -> None:
        unique, counts = np.unique(ids[ids != 0], return_counts=True)
        self._ids.append(unique)
        self._counts.append(counts.astype(np.int64))
        self._pending += len(unique)
        if self._pending >= max(self._merged, self.min_pending):
            self._merge()

    def _merge(self) -> None:
        ids = np.concatenate([np.empty(0, np.int64), *self._ids])
        counts = np.concatenate([np.empty(0, np.int64), *self._counts])
        order = np.argsort(ids, kind="stable")  # the parts are sorted runs: a merge, not a full sort
        ids, counts = ids[order], counts[order]
        starts = np.flatnonzero(_run_starts(ids))
        self._ids = [ids[starts]]
        self._counts = [np.add.reduceat(counts, starts)]
        self._merged, self._pending = len(starts), 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted distinct IDs and their counts."""
        self._merge()
        return self._ids[0], self._counts[0]


@dataclass
class TrainUserCounts:
    """What the vocabularies need from the train user table, gathered slice by slice."""

    counters: dict[str, IdCounter] = field(
        default_factory=lambda: {
            name: IdCounter() for name in (schema.USER, *schema.USER_ATTRS, schema.HIST_ITEMS, schema.HIST_CATES)
        }
    )

    def add(self, users: pa.RecordBatch) -> None:
        """Count one slice: every row once (history items count once per user row, not per sample)."""
        for name, counter in self.counters.items():
            counter.add(_ids(users.column(name)))

    def distinct(self, name: str) -> np.ndarray:
        return self.counters[name].result()[0]


@dataclass(frozen=True)
class ItemTable:
    """The item features as arrays (4 M rows: ~130 MB), for the vocabularies and the item join."""

    columns: dict[str, np.ndarray]  # 205, 206, 213, 214 in file order
    map: IdMap  # distinct non-zero 205 -> 1 + index into `attributes`
    attributes: dict[str, np.ndarray]  # 206, 213, 214 of each key, after a leading 0 for 'not found'

    @classmethod
    def read(cls, table: RawTable, progress: bool) -> "ItemTable":
        columns = table.read_columns(list(schema.RAW_ITEM_SCHEMA.names), progress)
        items = columns[schema.TARGET_ITEM]
        rows = _first_occurrences(items)
        repeats = int(np.count_nonzero(items)) - len(rows)
        if repeats:
            log.warning(
                "%s: %d row(s) repeat the item ID (205) of an earlier row; the first row of each item is used", table.path, repeats
            )
        attributes = {name: np.concatenate([[0], columns[name][rows]]) for name in _ITEM_ATTRIBUTES}
        return cls(columns, IdMap(items[rows], "item_features"), attributes)

    def lookup(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """206, 213, 214 of each target item; 0 for an item the table lacks."""
        rows = self.map.remap(items)
        return {name: values[rows] for name, values in self.attributes.items()}


def _write_vocabularies(layout: DatasetLayout, counts: TrainUserCounts, items: ItemTable, coverage: float) -> dict:
    """Every `{field}_sorted_map.npy` and the coverage item map (under the p90 name); returns their sizes."""
    history, history_counts = counts.counters[schema.HIST_ITEMS].result()
    targets = items.columns[schema.TARGET_ITEM]
    maps = {
        schema.USER: sorted_vocab(counts.distinct(schema.USER)),
        **{name: sorted_vocab(counts.distinct(name)) for name in schema.USER_ATTRS},
        schema.ITEM_MAP: sorted_vocab(history, targets),
        schema.CATE_MAP: sorted_vocab(counts.distinct(schema.HIST_CATES), items.columns[schema.TARGET_CATE]),
        **{name: sorted_vocab(items.columns[name]) for name in schema.ITEM_ATTRS},
    }
    for name, keys in maps.items():
        save_npy(layout.map_path(name, "full"), keys)
    p90 = coverage_vocab(history, history_counts, targets, coverage)
    save_npy(layout.map_path(schema.ITEM_MAP, "p90"), p90)
    threshold = coverage_threshold(history_counts, coverage)
    log.info(
        "feature maps in %s; coverage %.3f keeps history items seen >= %d times: %d of %d items",
        layout.feature_map_dir, coverage, threshold, len(p90), len(maps[schema.ITEM_MAP]),
    )
    sizes = {name: len(keys) for name, keys in maps.items()}
    return sizes | {f"{schema.ITEM_MAP}_p90": len(p90), "coverage_threshold": threshold}


# -- SCL -------------------------------------------------------------------------------------------
def _write_scl(table: RawTable, layout: DatasetLayout, strict: bool, progress: bool) -> dict:
    """SCL keys sorted ascending and the values in the same order; repeated keys: the first row wins.

    Only the keys (and where each row goes) are held in memory: the values are read slice by slice
    and scattered into a memory-mapped .npy. The keys file is written last, once the values are.
    """
    keys = table.read_columns([schema.TARGET_ITEM], progress)[schema.TARGET_ITEM]
    rows = _first_occurrences(keys)
    report = _check_scl_keys(table.path, keys, len(rows), strict)
    destination = np.full(len(keys), -1, np.int64)
    destination[rows] = np.arange(len(rows))
    shape = (len(rows), schema.SCL_DIM)
    with npy_memmap_writer(layout.scl_values_path, shape, np.dtype(np.int8)) as values:
        start = 0
        with _stage("SCL values", len(keys), "row", progress) as advance:
            for batch, where in table.batches([schema.SCL_TARGET], SCL_BATCH_ROWS):
                vectors = _scl_vectors(batch.column(0), where)
                target = destination[start : start + len(vectors)]
                kept = target >= 0
                values[target[kept]] = vectors[kept]
                start += len(vectors)
                advance(len(vectors))
    save_npy(layout.scl_keys_path, keys[rows])
    log.info("SCL table: %d rows in %s and %s", len(rows), layout.scl_keys_path, layout.scl_values_path)
    return report


def _check_scl_keys(path: Path, keys: np.ndarray, kept: int, strict: bool) -> dict:
    """Warn about (or, strict, refuse) keys that are not sorted, unique and non-zero: `feature_map.SclIndex`'s policy."""
    unsorted = first_unsorted_position(keys)
    zeros = int(np.count_nonzero(keys == 0))
    repeats = int(np.count_nonzero(keys)) - kept
    report = {"rows_in": len(keys), "rows": kept, "repeated_keys": repeats, "zero_keys": zeros, "sorted": unsorted is None}
    if unsorted is None and not zeros:
        return report
    problem = (
        f"{path}: column {schema.TARGET_ITEM!r} (the SCL keys) must be sorted, unique and non-zero; found "
        f"{repeats} repeated key(s) and {zeros} key(s) 0"
    )
    if unsorted is not None:
        problem += f", the first out of order at row {unsorted}: {keys[unsorted]} then {keys[unsorted + 1]}"
    if strict:
        raise DataError(problem + "; refused because strict checking is on")
    log.warning("%s; writing them sorted: the first row of a repeated key wins, keys 0 are dropped", problem)
    return report


def _scl_vectors(column: pa.ListArray, where: str) -> np.ndarray:
    """The int8 [n, 128] vectors of a slice, after checking every list holds exactly 128 values."""
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy()
    expected = f"column {schema.SCL_TARGET!r} must hold {schema.SCL_DIM} int8 values"
    bad = np.flatnonzero(lengths != schema.SCL_DIM)
    if len(bad):
        row = int(bad[0])
        raise DataError(f"{where}, row {row}: {expected}, found {'null' if lengths[row] < 0 else f'{lengths[row]} values'}")
    flat = column.flatten()
    if flat.null_count:
        row = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // schema.SCL_DIM
        raise DataError(f"{where}, row {row}: {expected}, found a null value")
    return flat.to_numpy().reshape(-1, schema.SCL_DIM)


# -- joining ---------------------------------------------------------------------------------------
@dataclass
class Samples:
    """A split's impressions sorted by user; stable, so each user's samples keep their file order."""

    clicks: np.ndarray  # int8
    users: np.ndarray  # int64, ascending
    items: np.ndarray  # int64 target items
    file_rows: np.ndarray  # row of each sample in the samples file
    joined: np.ndarray  # bool: already emitted with a user row
    users_joined: int = 0
    repeated_user_rows: int = 0

    @classmethod
    def read(cls, table: RawTable, progress: bool) -> "Samples":
        columns = table.read_columns([schema.LABEL, schema.USER, schema.TARGET_ITEM], progress)
        order = np.argsort(columns[schema.USER], kind="stable")
        file_rows = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        by_user = {name: columns.pop(name)[order] for name in list(columns)}  # one column copied at a time
        clicks, users, items = (by_user[name] for name in (schema.LABEL, schema.USER, schema.TARGET_ITEM))
        return cls(clicks, users, items, file_rows, np.zeros(len(file_rows), bool))

    def claim(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the samples of a slice of user rows, and the row each joins; marks them joined.

        A user row joins its samples unless its user is 0 or an earlier row already joined them.
        """
        lo = np.searchsorted(self.users, users, side="left")
        hi = np.searchsorted(self.users, users, side="right")
        has_samples = (hi > lo) & (users != 0)
        first_in_slice = np.zeros(len(users), bool)
        first_in_slice[np.unique(users, return_index=True)[1]] = True
        joined_before = np.zeros(len(users), bool)
        joined_before[has_samples] = self.joined[lo[has_samples]]
        rows = np.flatnonzero(has_samples & first_in_slice & ~joined_before)
        self.repeated_user_rows += int(np.count_nonzero(has_samples)) - len(rows)
        self.users_joined += len(rows)
        counts = hi[rows] - lo[rows]
        out_starts = np.cumsum(counts) - counts
        positions = np.arange(counts.sum()) + np.repeat(lo[rows] - out_starts, counts)
        self.joined[positions] = True
        return positions, np.repeat(rows, counts)

    def unjoined(self) -> np.ndarray:
        """Positions of the samples no user row joined, in sample-file order."""
        positions = np.flatnonzero(~self.joined)
        return positions[np.argsort(self.file_rows[positions], kind="stable")]


def _checked_users(batch: pa.RecordBatch, where: str) -> pa.RecordBatch:
    """A slice of a user table with dense sequences, after checking they are aligned."""
    sequences = {name: dense_list(batch.column(name)) for name in (schema.HIST_ITEMS, schema.HIST_CATES)}
    check_aligned(sequences[schema.HIST_ITEMS], sequences[schema.HIST_CATES], where)
    names = schema.RAW_USER_SCHEMA.names
    return pa.RecordBatch.from_arrays([sequences.get(name, batch.column(name)) for name in names], schema=schema.RAW_USER_SCHEMA)


def _one_hot(clicks: np.ndarray) -> pa.ListArray:
    pairs = np.stack([1 - clicks, clicks], axis=1).astype(np.int8).reshape(-1)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(pairs) + 1, 2, dtype=np.int32)), pa.array(pairs, pa.int8()))


def _user_columns(users: pa.RecordBatch, owner: np.ndarray) -> dict:
    """User attributes and sequences of each output row; `owner` is its row of `users`."""
    taken = pa.array(owner)
    attributes = {name: _ids(users.column(name))[owner] for name in schema.USER_ATTRS}
    return attributes | {name: pc.take(users.column(name), taken) for name in (schema.HIST_ITEMS, schema.HIST_CATES)}


def _missing_user_columns(rows: int) -> dict:
    """What a sample without a user row gets: attributes 0, empty sequences."""
    empty = pa.ListArray.from_arrays(pa.array(np.zeros(rows + 1, np.int32)), pa.array([], pa.int64()))
    return {name: np.zeros(rows, np.int64) for name in schema.USER_ATTRS} | {schema.HIST_ITEMS: empty, schema.HIST_CATES: empty}


def _joined_table(samples: Samples, positions: np.ndarray, items: ItemTable, user_columns: dict) -> pa.Table:
    """Joined rows of the samples at `positions`, given their user columns; the target item is looked up."""
    targets = samples.items[positions]
    columns = {
        schema.LABEL: _one_hot(samples.clicks[positions]),
        schema.USER: samples.users[positions],
        schema.TARGET_ITEM: targets,
        **items.lookup(targets),
        **user_columns,
    }
    return pa.Table.from_arrays([columns[name] for name in schema.JOINED_SCHEMA.names], schema=schema.JOINED_SCHEMA)


def _join_split(
    split: str, tables: dict[str, RawTable], items: ItemTable, writer: ShardWriter, counts: TrainUserCounts | None, progress: bool
) -> dict:
    """Write one split's joined rows (the module doc's order); count the user table into `counts` if given."""
    samples = Samples.read(tables[f"{split}_samples"], progress)
    users_table = tables[f"{split}_user_features"]
    with _stage(f"join {split}", users_table.num_rows, "user", progress) as advance:
        for batch, where in users_table.batches(list(schema.RAW_USER_SCHEMA.names), USER_BATCH_ROWS):
            users = _checked_users(batch, where)
            if counts is not None:
                counts.add(users)
            positions, owner = samples.claim(_ids(users.column(schema.USER)))
            if len(positions):
                writer.write(_joined_table(samples, positions, items, _user_columns(users, owner)))
            advance(batch.num_rows)
    unjoined = samples.unjoined()
    with _stage(f"{split} samples without a user row", len(unjoined), "row", progress) as advance:
        for start in range(0, len(unjoined), READ_BATCH_ROWS):
            positions = unjoined[start : start + READ_BATCH_ROWS]
            writer.write(_joined_table(samples, positions, items, _missing_user_columns(len(positions))))
            advance(len(positions))
    if samples.repeated_user_rows:
        log.warning(
            "%s: %d row(s) repeat a user (129_1) that an earlier row already joined; the first row of each user is used",
            users_table.path, samples.repeated_user_rows,
        )
    rows = len(samples.users)
    without_item = int(np.count_nonzero(items.map.remap(samples.items) == 0))
    log.info("%s: %d rows, %d without a user row, %d without an item row", split, rows, len(unjoined), without_item)
    return {
        "rows": rows,
        "click_rate": float(samples.clicks.mean()) if rows else 0.0,
        "users": samples.users_joined,
        "samples_without_user": len(unjoined),
        "samples_without_item": without_item,
        "repeated_user_rows": samples.repeated_user_rows,
    }


# -- the command -----------------------------------------------------------------------------------
COMMAND = "prepare"  # the name in output markers and swap journals
ENTRIES = (*SPLITS, FEATURE_MAP_DIR)
"""What a run replaces in its output directory (splits first: see `atomic.staged_swap`); raw/ is not its own."""


def _write_item_content(path: Path, layout: DatasetLayout) -> dict | None:
    """The optional raw item content table (method lemur), checked and sorted by item ID, into
    feature_map/item_content.parquet; None when the raw folder has none."""
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    content_fields(table.schema, path)
    table = table.sort_by(schema.TARGET_ITEM)
    ids = table.column(schema.TARGET_ITEM).to_numpy()
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise DataError(f"{path}: column {schema.TARGET_ITEM} has duplicated item IDs")
    write_table(layout.item_content_path, table)
    return {"items": len(ids), "fields": [name for name in table.column_names if name != schema.TARGET_ITEM]}


def prepare(
    raw: str | Path,
    out: str | Path,
    coverage: float = 0.9,
    strict: bool = False,
    rows_per_shard: int = 500_000,
    row_group_rows: int = 10_000,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Rebuild the released data set in `out` from the raw tables in `raw`; returns a summary.

    Every input is opened and its columns checked before anything is written; nothing of an
    earlier run in `out` is deleted before this run has written all its files, and a data set
    prepare did not write is replaced only with `force` (see the module doc).
    """
    if not 0.0 < coverage <= 1.0:
        raise ConfigError(f"coverage: expected a share of history interactions in (0, 1], found {coverage!r}")
    start = time.perf_counter()
    raw = Path(raw)
    tables = {name: RawTable.open(raw / f"{name}.parquet", expected) for name, expected in RAW_SCHEMAS.items()}
    layout = DatasetLayout(out)
    extra = {"coverage": coverage, "source": str(raw.resolve()), "prepared_by": "muse-rec prepare"}
    params = {"source": extra["source"], "coverage": coverage, "strict": strict, "rows_per_shard": rows_per_shard, "row_group_rows": row_group_rows}
    claim_output_dir(layout.root, COMMAND, params, ENTRIES, force)
    with staged_swap(layout.root, COMMAND, ENTRIES) as staging_root:
        staging = DatasetLayout(staging_root)
        writers = {split: ShardWriter(staging, split, rows_per_shard, row_group_rows, dict(extra)) for split in SPLITS}
        items = ItemTable.read(tables["item_features"], progress)
        scl = _write_scl(tables["scl_embedding_int8_p90"], staging, strict, progress)
        content = _write_item_content(raw / "item_content.parquet", staging)
        counts = TrainUserCounts()
        splits = {"train": _join_split("train", tables, items, writers["train"], counts, progress)}
        vocab_sizes = _write_vocabularies(staging, counts, items, coverage)
        del counts
        splits["test"] = _join_split("test", tables, items, writers["test"], None, progress)
        for split, writer in writers.items():
            writer.extra_metadata |= {"users": splits[split]["users"], "click_rate": splits[split]["click_rate"]}
            splits[split]["shards"] = writer.close()["num_shards"]
    mark_output(layout.root, COMMAND, params)
    seconds = time.perf_counter() - start
    rows = sum(s["rows"] for s in splits.values())
    summary = {
        "raw": str(raw),
        "out": str(layout.root),
        "coverage": coverage,
        "vocab_sizes": vocab_sizes,
        "scl": scl,
        "item_content": content,
        "splits": splits,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / max(seconds, 1e-9)),
    }
    log.info("prepared data set in %s: %s", layout.root, summary)
    return summary
