"""Arrow types of the TAOBAO-MM tables, in one place; the field names are `muse_rec.schema`'s
(re-exported here, so data code reads `schema.HIST_ITEMS` beside `schema.JOINED_SCHEMA`)."""
from __future__ import annotations

import pyarrow as pa

from muse_rec.schema import (  # noqa: F401  the names, re-exported for the data modules
    CATE_MAP, FEATURE_MAPS, HIST_CATES, HIST_ITEMS, ITEM_ATTRS, ITEM_MAP, LABEL, MAP_OF_COLUMN, SCL_DIM, SCL_LONG,
    PAD_TOKEN, SCL_TARGET, SEP_TOKEN, SHORT_CATES, SHORT_ITEMS, TARGET_CATE, TARGET_ITEM, TOP_CATES, TOP_ITEMS, USER, USER_ATTRS, VOCABS,
)

_INT = pa.int64()
_ID_LIST = pa.list_(pa.int64())

JOINED_SCHEMA = pa.schema(
    [pa.field(LABEL, pa.list_(pa.int8())), pa.field(USER, _INT)]
    + [pa.field(name, _INT) for name in USER_ATTRS]
    + [pa.field(HIST_ITEMS, _ID_LIST), pa.field(HIST_CATES, _ID_LIST)]
    + [pa.field(TARGET_ITEM, _INT), pa.field(TARGET_CATE, _INT)]
    + [pa.field(name, _INT) for name in ITEM_ATTRS]
)
"""One row of a train/test shard: an impression joined with its user and target item."""

RAW_SAMPLES_SCHEMA = pa.schema([pa.field(LABEL, pa.list_(pa.int8())), pa.field(USER, _INT), pa.field(TARGET_ITEM, _INT)])
RAW_USER_SCHEMA = pa.schema(
    [pa.field(USER, _INT)]
    + [pa.field(name, _INT) for name in USER_ATTRS]
    + [pa.field(HIST_ITEMS, _ID_LIST), pa.field(HIST_CATES, _ID_LIST)]
)
RAW_ITEM_SCHEMA = pa.schema([pa.field(name, _INT) for name in (TARGET_ITEM, TARGET_CATE, *ITEM_ATTRS)])
RAW_SCL_SCHEMA = pa.schema([pa.field(TARGET_ITEM, _INT), pa.field(SCL_TARGET, pa.list_(pa.int8()))])

TITLE_TOKENS = "title_tokens"
CONTENT_SCHEMA = pa.schema([pa.field(TARGET_ITEM, _INT), pa.field(TITLE_TOKENS, pa.list_(pa.int32()))])
"""feature_map/item_content.parquet: one row per item (raw 205 ID, unique), its title as token IDs.
Further list<int32> columns are extra text fields. Token 0 is padding and 1 the field separator
(`PAD_TOKEN`, `SEP_TOKEN`)."""
