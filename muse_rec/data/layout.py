"""Where each file of a TAOBAO-MM data directory lives (the layout the hub ships), and its metadata.

```
root/train/train-shard-000000.parquet ... metadata.json     joined rows (schema.JOINED_SCHEMA)
root/test/test-shard-000000.parquet ...  metadata.json
root/feature_map/{field}_sorted_map.npy                     sorted raw IDs of each vocabulary
root/feature_map/150_2_180_sorted_map_p90.npy               the p90 item vocabulary
root/feature_map/scl_emb_int8_p90_keys.npy / _values.npy    SCL table: int64 [N], int8 [N, 128]
root/feature_map/item_content.parquet                       item titles as tokens (method lemur; optional)
root/raw/...                                                the unjoined tables (optional)
```
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from muse_rec.data import schema
from muse_rec.errors import DataError

SPLITS = ("train", "test")
FEATURE_MAP_DIR, RAW_DIR = "feature_map", "raw"
ENTRIES = (*SPLITS, FEATURE_MAP_DIR, RAW_DIR)
"""The top-level entries of a data set, those whose presence marks it complete (the splits) first."""
RAW_TABLES = (
    "train_samples",
    "test_samples",
    "train_user_features",
    "test_user_features",
    "item_features",
    "scl_embedding_int8_p90",
)


@dataclass(frozen=True)
class DatasetLayout:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- joined shards -------------------------------------------------------------------------
    def split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        return self.root / split

    def shard_path(self, split: str, index: int) -> Path:
        return self.split_dir(split) / f"{split}-shard-{index:06d}.parquet"

    def shards(self, split: str) -> list[Path]:
        """The split's shard files in order (temporary `.partial` files are not shards)."""
        return sorted(self.split_dir(split).glob(f"{split}-shard-*.parquet"))

    def metadata_path(self, split: str) -> Path:
        return self.split_dir(split) / "metadata.json"

    def read_metadata(self, split: str) -> dict:
        path = self.metadata_path(split)
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: missing (every split directory needs a metadata.json)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("total_rows"), int):
            raise DataError(f"{path}: expected an object with an integer 'total_rows', found {meta!r:.200}")
        return meta

    # -- feature maps --------------------------------------------------------------------------
    @property
    def feature_map_dir(self) -> Path:
        return self.root / FEATURE_MAP_DIR

    def map_path(self, field: str, vocab: str = "full") -> Path:
        """The sorted map of `field`; `vocab` only matters for the item map (p90 or full)."""
        if field not in schema.FEATURE_MAPS:
            raise DataError(f"no feature map for field {field!r}: maps exist for {', '.join(schema.FEATURE_MAPS)}")
        if vocab not in schema.VOCABS:
            raise DataError(f"unknown vocabulary {vocab!r}: expected one of {', '.join(schema.VOCABS)}")
        suffix = "_p90" if field == schema.ITEM_MAP and vocab == "p90" else ""
        return self.feature_map_dir / f"{field}_sorted_map{suffix}.npy"

    @property
    def scl_keys_path(self) -> Path:
        return self.feature_map_dir / "scl_emb_int8_p90_keys.npy"

    @property
    def scl_values_path(self) -> Path:
        return self.feature_map_dir / "scl_emb_int8_p90_values.npy"

    @property
    def item_content_path(self) -> Path:
        return self.feature_map_dir / "item_content.parquet"

    # -- raw tables ----------------------------------------------------------------------------
    @property
    def raw_dir(self) -> Path:
        return self.root / RAW_DIR

    def raw_table(self, name: str) -> Path:
        if name not in RAW_TABLES:
            raise DataError(f"unknown raw table {name!r}: expected one of {', '.join(RAW_TABLES)}")
        return self.raw_dir / f"{name}.parquet"
