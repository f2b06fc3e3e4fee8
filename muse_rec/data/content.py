"""Item content for the LEMUR encoder: `feature_map/item_content.parquet` as a token matrix by item row.

The table (schema.CONTENT_SCHEMA) has one row per item: its raw 205 ID and its title as token IDs,
plus optional further list<int32> text fields. An item's encoder input is its fields in column
order, separated by token 1, cut or zero-padded to `max_tokens`. Row r of the matrix is
the item of item-table row r, so the model gathers target tokens by the rows it already has; row 0
(padding / out of vocabulary) and items without content are all padding. The matrix is
rows x max_tokens int32 on every rank (35 M p90 items x 16 tokens = 2.3 GB): the place to move to a
memory-mapped file when real titles at the full vocabulary come.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_rec.data import schema
from muse_rec.data.feature_map import IdMap
from muse_rec.data.layout import DatasetLayout
from muse_rec.errors import DataError


def content_fields(table_schema: pa.Schema, path: object) -> list[str]:
    """The text columns of a content table, checked: `205` int64, then one or more list<int32>."""
    if schema.TARGET_ITEM not in table_schema.names or table_schema.field(schema.TARGET_ITEM).type != pa.int64():
        raise DataError(f"{path}: expected an int64 column {schema.TARGET_ITEM!r} (raw item ID), found schema {table_schema}")
    fields = [f.name for f in table_schema if f.name != schema.TARGET_ITEM]
    wrong = [f"{f.name} ({f.type})" for f in table_schema if f.name != schema.TARGET_ITEM and f.type not in (pa.list_(pa.int32()), pa.list_(pa.int64()))]
    if wrong or schema.TITLE_TOKENS not in fields:
        raise DataError(f"{path}: expected a list<int32> column {schema.TITLE_TOKENS!r} and only list<int32> text fields, found {wrong or fields}")
    return fields


def load_content_tokens(layout: DatasetLayout, items: IdMap, max_tokens: int) -> np.ndarray:
    """(items.num_rows, max_tokens) int32 token matrix by item row."""
    path = layout.item_content_path
    if not path.exists():
        raise DataError(f"{path}: no item content table; method lemur with model.lemur.content_input=tokens needs it "
                        "(`muse-rec synth` writes one; or set model.lemur.content_input=scl)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    fields = content_fields(table.schema, path)
    ids = table.column(schema.TARGET_ITEM).to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise DataError(f"{path}: column {schema.TARGET_ITEM} has duplicated item IDs")
    tokens = np.zeros((items.num_rows, max_tokens), np.int32)
    rows = items.remap(ids)
    known = rows > 0
    filled = np.zeros(len(ids), np.int64)  # tokens written so far per content row
    for index, name in enumerate(fields):
        column = table.column(name).combine_chunks()
        if column.null_count:
            raise DataError(f"{path}: column {name} has null lists")
        lengths = np.diff(column.offsets.to_numpy())
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
        if len(values) and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
            raise DataError(f"{path}: column {name} holds token IDs outside [0, 2^31)")
        if index > 0:
            _place(tokens, rows[known], filled[known], np.full(int(known.sum()), schema.SEP_TOKEN))
            filled[known] += 1
        owner = np.repeat(np.arange(len(ids)), lengths)
        position = np.arange(len(values)) - np.repeat(column.offsets.to_numpy()[:-1], lengths)
        keep = known[owner]
        _place(tokens, rows[owner[keep]], filled[owner[keep]] + position[keep], values[keep])
        filled[known] += lengths[known]
    return tokens


def _place(tokens: np.ndarray, rows: np.ndarray, columns: np.ndarray, values: np.ndarray) -> None:
    """tokens[rows, columns] = values where the column is inside the matrix (longer text is cut)."""
    inside = columns < tokens.shape[1]
    tokens[rows[inside], columns[inside]] = values[inside]
