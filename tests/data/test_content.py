"""Item content tables: tokens by item row (fields joined by the separator, cut to max_tokens),
and clear errors for bad tables, from `load_content_tokens` and `muse-rec verify`."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse_rec.data import schema
from muse_rec.data.content import load_content_tokens
from muse_rec.data.feature_map import IdMap
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.verify import verify
from muse_rec.errors import DataError

ITEMS = IdMap(np.array([10, 20, 30], dtype=np.int64))  # rows 1, 2, 3


def write(root, columns: dict, types: dict | None = None) -> DatasetLayout:
    layout = DatasetLayout(root)
    layout.feature_map_dir.mkdir(parents=True, exist_ok=True)
    types = types or {}
    arrays = {name: pa.array(values, types.get(name, pa.int64() if name == schema.TARGET_ITEM else pa.list_(pa.int32())))
              for name, values in columns.items()}
    pq.write_table(pa.table(arrays), layout.item_content_path)
    return layout


def test_tokens_by_item_row_with_fields_separated_and_cut(tmp_path):
    layout = write(tmp_path, {
        schema.TARGET_ITEM: [30, 10, 99],  # 99 is not in the item map: ignored
        schema.TITLE_TOKENS: [[7, 8], [2, 3, 4, 5, 6], [9]],
        "ocr_tokens": [[11], [12], [13]],
    })
    tokens = load_content_tokens(layout, ITEMS, max_tokens=5)
    assert tokens.tolist() == [
        [0, 0, 0, 0, 0],  # row 0: padding / OOV
        [2, 3, 4, 5, 6],  # item 10: the title fills the row, the second field is cut
        [0, 0, 0, 0, 0],  # item 20: no content
        [7, 8, schema.SEP_TOKEN, 11, 0],  # item 30: title, separator, second field, padding
    ]


@pytest.mark.parametrize("columns, types, message", [
    ({"item": [10], schema.TITLE_TOKENS: [[1]]}, {"item": pa.int64()}, "expected an int64 column '205'"),
    ({schema.TARGET_ITEM: [10], "title": [[1]]}, {}, "expected a list<int32> column 'title_tokens'"),
    ({schema.TARGET_ITEM: [10], schema.TITLE_TOKENS: [["a"]]}, {schema.TITLE_TOKENS: pa.list_(pa.string())}, "title_tokens (list<element: string>)"),
    ({schema.TARGET_ITEM: [10, 10], schema.TITLE_TOKENS: [[1], [2]]}, {}, "duplicated item IDs"),
], ids=["no-item-column", "no-title", "string-tokens", "duplicates"])
def test_bad_tables_are_refused_by_load_and_verify(tmp_path, columns, types, message):
    layout = write(tmp_path, columns, types)
    with pytest.raises(DataError) as error:
        load_content_tokens(layout, ITEMS, max_tokens=4)
    assert str(layout.item_content_path) in str(error.value) and message in str(error.value)
    assert any(f.path == str(layout.item_content_path) and message in f.message for f in verify(tmp_path, progress=False))


def test_synthetic_data_verifies_with_its_content(synthetic_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    assert not [f for f in verify(copy, progress=False) if f.level == "ERROR"]
    pq.write_table(pa.table({schema.TARGET_ITEM: pa.array([1, 1])}), DatasetLayout(copy).item_content_path)
    assert any("item_content" in f.path for f in verify(copy, progress=False))
