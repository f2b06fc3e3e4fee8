"""Field names of TAOBAO-MM and of the features derived from them: what `Batch` carries and the
model reads. Top level (no pyarrow, no file code), so that `muse_rec.model` needs nothing of
`muse_rec.data`; the Arrow schemas of the stored tables live in `muse_rec.data.schema`.

Field names are the data set's own (`150_2_180` = lifelong behaviour items, ...); see
`shared/spec/taobao-mm.md`. Every other module refers to these constants, never to literals.
"""
from __future__ import annotations

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
# Derived by the loader's GSU (`model.gsu_stage: loader`): the K positions it keeps, and the short
# sequence (the reference's names: the last `short_seq_len` positions of the padded long one).
TOP_ITEMS = "150_2_180_top"
TOP_CATES = "151_2_180_top"
SHORT_ITEMS = "150_1_180"
SHORT_CATES = "151_1_180"

SCL_DIM = 128
PAD_TOKEN, SEP_TOKEN = 0, 1
"""Item content tokens (feature_map/item_content.parquet): 0 pads, 1 separates text fields."""

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
