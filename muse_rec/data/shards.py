"""Writing joined shards in the released format: ZSTD parquet, row groups of 10,000, 500,000 rows a shard.

Each shard is written under a temporary name and renamed when complete; `metadata.json` is written
last, so a split directory with a metadata file is complete and one without it is not.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from muse_rec.data import schema
from muse_rec.data.atomic import PARTIAL_SUFFIX, atomic_path, partial_name, write_json
from muse_rec.data.layout import DatasetLayout

log = logging.getLogger(__name__)


class ShardWriter:
    """Appends tables of `schema.JOINED_SCHEMA` rows to a split, cutting shards and row groups."""

    def __init__(
        self,
        layout: DatasetLayout,
        split: str,
        rows_per_shard: int = 500_000,
        row_group_rows: int = 10_000,
        extra_metadata: dict | None = None,
    ) -> None:
        if rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError(f"rows_per_shard and row_group_rows must be positive, got {rows_per_shard}, {row_group_rows}")
        self.layout, self.split = layout, split
        self.rows_per_shard, self.row_group_rows = rows_per_shard, row_group_rows
        self.extra_metadata = extra_metadata or {}
        self._clear_split()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._shard_rows = 0
        self._shards: list[dict] = []

    def _clear_split(self) -> None:
        """Start clean: a re-run never mixes its shards with an earlier, interrupted run's."""
        directory = self.layout.split_dir(self.split)
        directory.mkdir(parents=True, exist_ok=True)
        self.layout.metadata_path(self.split).unlink(missing_ok=True)
        for stale in [*self.layout.shards(self.split), *directory.glob(f".*{PARTIAL_SUFFIX}")]:
            stale.unlink()

    def write(self, table: pa.Table) -> None:
        table = table.select(schema.JOINED_SCHEMA.names).cast(schema.JOINED_SCHEMA)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._next_cut():
            self._flush(self._next_cut())

    def _next_cut(self) -> int:
        """Rows to take next: a full row group, or less where the current shard ends first."""
        return min(self.row_group_rows, self.rows_per_shard - self._shard_rows)

    def _flush(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        self._pending, self._pending_rows = [rest], rest.num_rows
        if self._writer is None:
            self._open_shard()
        self._writer.write_table(group, row_group_size=rows)
        self._shard_rows += rows
        if self._shard_rows == self.rows_per_shard:
            self._close_shard()

    def _open_shard(self) -> None:
        path = self.layout.shard_path(self.split, len(self._shards))
        self._writer = pq.ParquetWriter(
            partial_name(path), schema.JOINED_SCHEMA, compression="zstd", use_dictionary=False
        )

    def _close_shard(self) -> None:
        path = self.layout.shard_path(self.split, len(self._shards))
        self._writer.close()
        partial_name(path).replace(path)
        self._shards.append({"file": path.name, "rows": self._shard_rows})
        self._writer, self._shard_rows = None, 0

    def close(self) -> dict:
        """Flush what is left, close the last shard and write metadata.json; returns the metadata."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is not None:
            self._close_shard()
        meta = {
            "total_rows": sum(s["rows"] for s in self._shards),
            "num_shards": len(self._shards),
            "rows_per_shard": self.rows_per_shard,
            "row_group_rows": self.row_group_rows,
            "shards": self._shards,
            **self.extra_metadata,
        }
        write_json(self.layout.metadata_path(self.split), meta)
        log.info("wrote %d rows in %d shard(s) to %s", meta["total_rows"], meta["num_shards"], self.layout.split_dir(self.split))
        return meta


def write_table(path: Path, table: pa.Table, row_group_rows: int = 10_000) -> None:
    """Write one parquet file (a raw table) under a temporary name, then rename it."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, row_group_size=row_group_rows)
