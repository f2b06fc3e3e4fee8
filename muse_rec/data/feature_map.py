"""Sorted feature maps (raw int64 ID -> embedding-table row) and the SCL key index.

Row of raw id x in a map with sorted keys K: `i + 1` if `K[i] == x` else 0, with `i =
searchsorted(K, x)`. Row 0 is padding / out-of-vocabulary. `remap_reference` is exactly that;
`IdMap.remap` computes the same thing an order of magnitude faster on large maps by first jumping
to a bucket of the key range (one slot per few keys) and binary-searching only inside it, so the
lookups of a 1000-long sequence hit a few cache lines instead of 25 levels of a 2 GB array.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from muse_rec.data import schema
from muse_rec.data.layout import DatasetLayout
from muse_rec.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 24  # elements per pass over memory-mapped arrays
_KEYS_PER_BUCKET_LOG2 = 2
_DIRECT_SEARCH_MAX_KEYS = 1 << 17  # maps this small stay in cache: plain searchsorted is faster


def remap_reference(keys: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Plain searchsorted remap: the definition `IdMap.remap` is tested against."""
    raw = np.asarray(raw, dtype=np.int64)
    if len(keys) == 0:
        return np.zeros(raw.shape, np.int64)
    pos = np.searchsorted(keys, raw)
    hit = keys[np.minimum(pos, len(keys) - 1)] == raw
    return np.where(hit, pos + 1, 0).astype(np.int64)


def first_unsorted_position(keys: np.ndarray) -> int | None:
    """Index i of the first pair with keys[i] >= keys[i + 1] (not strictly increasing), or None."""
    for start in range(0, max(len(keys) - 1, 0), _CHUNK):
        chunk = np.asarray(keys[start : start + _CHUNK + 1])
        bad = np.flatnonzero(chunk[1:] <= chunk[:-1])
        if len(bad):
            return start + int(bad[0])
    return None


class IdMap:
    """A vocabulary: sorted, unique, non-zero raw IDs; `remap` gives table rows (0 = pad/OOV)."""

    def __init__(self, keys: np.ndarray, name: str = "map") -> None:
        self.keys = keys.view(np.ndarray)  # a memmap's subclass makes every gather slower
        self.name = name
        n = len(keys)
        if n <= _DIRECT_SEARCH_MAX_KEYS:
            return
        self._low = np.int64(keys[0])
        span = int(keys[-1]) - int(keys[0])
        bits = max(0, n.bit_length() - _KEYS_PER_BUCKET_LOG2)
        self._shift = np.uint64(max(0, span.bit_length() - bits))
        num_buckets = (span >> int(self._shift)) + 1
        counts = np.zeros(num_buckets, np.int64)
        for start in range(0, n, _CHUNK):
            counts += np.bincount(self._bucket(np.asarray(keys[start : start + _CHUNK])), minlength=num_buckets)
        index_type = np.int32 if n < 2**31 else np.int64
        self._starts = np.zeros(num_buckets + 1, index_type)
        np.cumsum(counts, out=self._starts[1:])
        self._search_steps = int(counts.max()).bit_length()

    @property
    def num_rows(self) -> int:
        """Rows of the embedding table this map indexes: one per key plus the padding row 0."""
        return len(self.keys) + 1

    def _bucket(self, x: np.ndarray) -> np.ndarray:
        return ((x - self._low).view(np.uint64) >> self._shift).astype(np.intp)

    def remap(self, raw: np.ndarray) -> np.ndarray:
        """Table rows of `raw` (any shape, int64): equal to `remap_reference(self.keys, raw)`."""
        raw = np.asarray(raw, dtype=np.int64)
        n = len(self.keys)
        if n <= _DIRECT_SEARCH_MAX_KEYS:
            return remap_reference(self.keys, raw)
        out = np.zeros(raw.shape, np.int64)
        if raw.size == 0:
            return out
        flat = raw.reshape(-1)
        in_range = np.flatnonzero((flat >= self._low) & (flat <= self.keys[-1]))
        x = flat[in_range]
        bucket = self._bucket(x)
        lo = self._starts[bucket].astype(np.int64)
        hi = self._starts[bucket + 1].astype(np.int64)
        for _ in range(self._search_steps):  # lower bound inside [lo, hi): one halving per step
            mid = (lo + hi) >> 1
            right = self.keys[np.minimum(mid, n - 1)] < x
            right &= lo < hi
            np.copyto(lo, mid + 1, where=right)
            np.copyto(hi, mid, where=~right & (lo < hi))
        hit = self.keys[np.minimum(lo, n - 1)] == x
        out.reshape(-1)[in_range] = np.where(hit, lo + 1, 0)
        return out


def load_id_map(path: Path, name: str) -> IdMap:
    """Load and check a `{field}_sorted_map.npy`: 1-D int64, strictly increasing, no 0."""
    keys = _load_npy(path)
    if keys.ndim != 1 or keys.dtype != np.int64:
        raise DataError(f"{path}: expected a 1-D int64 array of raw IDs, found {keys.dtype} with shape {keys.shape}")
    bad = first_unsorted_position(keys)
    if bad is not None:
        raise DataError(
            f"{path}: feature map is not sorted strictly increasing: keys[{bad}] = {keys[bad]} >= "
            f"keys[{bad + 1}] = {keys[bad + 1]} (a map must hold each raw ID once, in ascending order)"
        )
    if len(keys):
        zero = np.searchsorted(keys, 0)
        if zero < len(keys) and keys[zero] == 0:
            raise DataError(f"{path}: feature map contains the ID 0 at index {zero}; 0 means 'missing' and maps to row 0")
    return IdMap(keys, name)


def _count_zeros(ascending: np.ndarray) -> int:
    """How many keys of an ascending array are 0 (two binary searches, no scan)."""
    return int(np.searchsorted(ascending, 0, side="right") - np.searchsorted(ascending, 0, side="left"))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None


class SclIndex:
    """Raw item ID -> row of the frozen SCL table, whose row `i + 1` is `values[i]` (row 0 = zeros).

    The released keys are not guaranteed sorted or unique. Sorted unique non-zero keys are used as
    they are; otherwise (unless `strict`) the index is built once over a stable sort, with a
    warning: of duplicated keys the first one in file order wins, and a key 0 is dropped (0 means
    'missing', so a missing target must read the zero row, never a real vector). The values file is
    never reordered, so the table can be filled from it by a straight chunked copy.
    """

    def __init__(self, keys_path: Path, values_path: Path, strict: bool = False) -> None:
        keys = _load_npy(keys_path)
        values = _load_npy(values_path)
        if keys.ndim != 1 or keys.dtype != np.int64:
            raise DataError(f"{keys_path}: expected a 1-D int64 array, found {keys.dtype} with shape {keys.shape}")
        if values.dtype != np.int8 or values.shape != (len(keys), schema.SCL_DIM):
            raise DataError(
                f"{values_path}: expected int8 of shape ({len(keys)}, {schema.SCL_DIM}) to match {keys_path.name}, "
                f"found {values.dtype} of shape {values.shape}"
            )
        self.values = values.view(np.ndarray)  # still the memory map (pages shared by every process of a host); a plain view gathers faster
        self.values_path = values_path
        self._value_rows: np.ndarray | None = None  # sorted-key position -> values row, when reordered
        bad = first_unsorted_position(keys)
        if bad is None and not _count_zeros(keys):
            self.map = IdMap(keys, "scl")
            return
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        first = np.ones(len(keys), bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        duplicates, zeros = int(len(keys) - first.sum()), _count_zeros(sorted_keys)
        problem = f"{keys_path}: SCL keys are not sorted, unique and non-zero ({duplicates} duplicated key(s), {zeros} key(s) 0"
        problem += f"; first out of order at index {bad}: {keys[bad]} then {keys[bad + 1]})" if bad is not None else ")"
        if strict:
            raise DataError(problem + "; refused because strict checking is on")
        log.warning("%s; using a sorted index: the first occurrence of a duplicated key wins, keys 0 are dropped", problem)
        kept = first & (sorted_keys != 0)
        self.map = IdMap(np.ascontiguousarray(sorted_keys[kept]), "scl")
        self._value_rows = order[kept]

    @property
    def num_rows(self) -> int:
        """Rows of the SCL table: one per line of the values file plus the zero row 0."""
        return len(self.values) + 1

    def remap(self, raw: np.ndarray) -> np.ndarray:
        rows = self.map.remap(raw)
        if self._value_rows is None:
            return rows
        return np.where(rows > 0, self._value_rows[np.maximum(rows - 1, 0)] + 1, 0)


class FeatureMaps:
    """Every map one training run needs: ID maps by field, and the SCL index.

    A sequence item needs two lookups, its item row and its SCL row. `scl_of_items` answers the
    second from the first with one gather through a table item row -> SCL row, built once here:
    nothing when the SCL keys are the item vocabulary itself (the released p90 setting), one pass
    over the item keys otherwise. Raw IDs outside the item vocabulary are looked up directly.
    """

    def __init__(self, by_field: dict[str, IdMap], scl: SclIndex, vocab: str) -> None:
        self.by_field, self.scl, self.vocab = by_field, scl, vocab
        items = by_field[schema.ITEM_MAP].keys
        same_keys = scl._value_rows is None and len(scl.map.keys) == len(items) and np.array_equal(scl.map.keys, items)
        self._scl_of_item_row: np.ndarray | None = None
        if not same_keys:
            self._scl_of_item_row = np.zeros(len(items) + 1, np.int64)
            for start in range(0, len(items), _CHUNK):
                self._scl_of_item_row[1 + start : 1 + start + _CHUNK] = scl.remap(items[start : start + _CHUNK])

    @classmethod
    def load(cls, layout: DatasetLayout, vocab: str = "p90", strict: bool = False) -> "FeatureMaps":
        by_field = {field: load_id_map(layout.map_path(field, vocab), field) for field in schema.FEATURE_MAPS}
        return cls(by_field, SclIndex(layout.scl_keys_path, layout.scl_values_path, strict), vocab)

    def of_column(self, column: str) -> IdMap:
        return self.by_field[schema.MAP_OF_COLUMN[column]]

    def scl_of_items(self, raw: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """SCL rows of raw item IDs whose item rows are known: equal to `self.scl.remap(raw)`."""
        if self._scl_of_item_row is None:
            return item_rows.copy()
        out = self._scl_of_item_row[item_rows]
        unknown = np.flatnonzero((item_rows == 0) & (raw != 0))  # out of the item vocabulary
        out[unknown] = self.scl.remap(raw[unknown])
        return out

    def table_rows(self) -> dict[str, int]:
        """Embedding-table sizes (with the padding row), keyed by map field, plus 'scl'."""
        return {field: m.num_rows for field, m in self.by_field.items()} | {"scl": self.scl.num_rows}
