"""Small hand-built data sets in the released layout, for loader tests with exactly known contents."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from muse_rec.data import schema
from muse_rec.data.atomic import save_npy
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.shards import ShardWriter

SCALARS = (schema.USER, *schema.USER_ATTRS, schema.TARGET_ITEM, schema.TARGET_CATE, *schema.ITEM_ATTRS)


def make_rows(num_users: int, seed: int = 0, max_len: int = 12, impressions: tuple[int, int] = (1, 5)) -> list[dict]:
    """Joined rows grouped by user; IDs are small positive ints, some 0 (missing), sequences of 0..max_len."""
    rng = np.random.default_rng(seed)
    rows, target = [], 1000
    for user in range(1, num_users + 1):
        n = int(rng.integers(0, max_len + 1))
        items = rng.integers(0, 60, n).tolist()  # 0 = missing; ids >= 50 are out of the item vocabulary
        cates = rng.integers(0, 12, n).tolist()
        attrs = rng.integers(0, 6, len(schema.USER_ATTRS)).tolist()
        for _ in range(int(rng.integers(*impressions))):
            target += 1  # unique per row: identifies rows in tests
            click = int(rng.random() < 0.3)
            rows.append(
                {
                    schema.LABEL: [1 - click, click],
                    schema.USER: user,
                    **dict(zip(schema.USER_ATTRS, attrs)),
                    schema.HIST_ITEMS: items,
                    schema.HIST_CATES: cates,
                    schema.TARGET_ITEM: target,
                    schema.TARGET_CATE: int(rng.integers(0, 12)),
                    schema.ITEM_ATTRS[0]: int(rng.integers(0, 4)),
                    schema.ITEM_ATTRS[1]: int(rng.integers(0, 4)),
                }
            )
    return rows


def write_maps(root: Path, rows: list[dict]) -> None:
    """Maps covering what the rows use, minus a few IDs left out on purpose (they must read as OOV)."""
    layout = DatasetLayout(root)
    targets = {r[schema.TARGET_ITEM] for r in rows}
    vocab = {
        schema.USER: {r[schema.USER] for r in rows if r[schema.USER] % 7},  # users 7, 14, ... are OOV
        **{c: {r[c] for r in rows} for c in schema.USER_ATTRS},
        schema.ITEM_MAP: set(range(1, 50)) | targets,
        schema.CATE_MAP: set(range(1, 12)) - {5},  # category 5 is OOV
        **{c: {r[c] for r in rows} for c in schema.ITEM_ATTRS},
    }
    for field, ids in vocab.items():
        save_npy(layout.map_path(field, "full"), np.array(sorted(ids - {0}), np.int64))
    p90 = np.array(sorted((set(range(1, 30)) | targets) - {0}), np.int64)
    save_npy(layout.map_path(schema.ITEM_MAP, "p90"), p90)
    scl_keys = np.array(sorted(set(range(3, 40)) | set(list(targets)[::2])), np.int64)  # some items lack SCL
    rng = np.random.default_rng(1)
    save_npy(layout.scl_keys_path, scl_keys)
    save_npy(layout.scl_values_path, rng.integers(-127, 128, (len(scl_keys), schema.SCL_DIM)).astype(np.int8))


def write_split(root: Path, split: str, rows: list[dict], rows_per_shard: int, row_group_rows: int) -> None:
    writer = ShardWriter(DatasetLayout(root), split, rows_per_shard=rows_per_shard, row_group_rows=row_group_rows)
    writer.write(pa.Table.from_pylist(rows, schema=schema.JOINED_SCHEMA))
    writer.close()


def make_dataset(root: Path, rows: list[dict], rows_per_shard: int = 40, row_group_rows: int = 16) -> Path:
    write_maps(root, rows)
    for split in ("train", "test"):
        write_split(root, split, rows, rows_per_shard, row_group_rows)
    return root
