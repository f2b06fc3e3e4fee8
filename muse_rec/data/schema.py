"""Column names and Arrow types of the TAOBAO-MM tables, in one place.

Field names are the data set's own (`150_2_180` = lifelong behaviour items, ...); see
`shared/spec/taobao-mm.md`. Every other module refers to these constants, never to literals.
"""
from __future__ import annotations

import pyarrow as pa

LABEL = "label_0"  # list<int8> one-hot: [1, 0] no click, [0, 1] click
USER = "129_1"
USER_ATTRS = ("130_1", "130_2", "130_3", "130_4", "130_5")
HIST_ITEMS = "150_2_180"  # lifelong behaviour items, oldest first, not padded
HIST_CATES = "151_2_180"  # category of each behaviour
TARGET_ITEM = "205"
TARGET_CATE = "206"
ITEM_ATTRS = ("213", "214")

# Derived by the loader (never stored): the SCL-table keys of the target and of the sequence
# (the same raw IDs, looked up in the SCL table instead of the item table).
SCL_TARGET = "205_c"
SCL_LONG = "150_2_180_c"

SCL_DIM = 128

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
Further list<int32> columns are extra text fields. Token 0 is padding and 1 the field separator."""
PAD_TOKEN, SEP_TOKEN = 0, 1

# Which sorted map remaps which stored column. Item and category tables are shared between the
# target and the sequences; there is no map of 206 (it uses the category map).
ITEM_MAP = HIST_ITEMS
CATE_MAP = HIST_CATES
MAP_OF_COLUMN = {
    USER: USER,
    **{name: name for name in USER_ATTRS},
    HIST_ITEMS: ITEM_MAP,
    HIST_CATES: CATE_MAP,
    TARGET_ITEM: ITEM_MAP,
    TARGET_CATE: CATE_MAP,
    **{name: name for name in ITEM_ATTRS},
}
FEATURE_MAPS = (USER, *USER_ATTRS, ITEM_MAP, CATE_MAP, *ITEM_ATTRS)
"""Fields with a `{field}_sorted_map.npy` file (the item map also has a p90 variant)."""

VOCABS = ("p90", "full")
