"""`verify` on the synthetic set: clean as written, then one finding per kind of damage, on copies."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse_rec.data import schema
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.verify import ERROR, WARNING, Finding, verify


@pytest.fixture
def layout(synthetic_root: Path, tmp_path: Path) -> DatasetLayout:
    """A private copy of the shared (read-only) synthetic set, free to damage."""
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    return DatasetLayout(root)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == ERROR]


def the_finding(findings: list[Finding], level: str, path: Path, *words: str) -> Finding:
    """The one finding of `level` on `path`; it must contain every one of `words`."""
    matching = [f for f in findings if f.level == level and f.path == str(path)]
    assert len(matching) == 1, f"expected one {level} on {path}, found {[str(f) for f in findings]}"
    for word in words:
        assert word in matching[0].message, f"{word!r} not in {matching[0]}"
    return matching[0]


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard with pyarrow after `change(table) -> table`, in row groups of 100 rows."""
    table = change(pq.read_table(path))
    pq.write_table(table, path, row_group_size=100, use_dictionary=False)


def edit_metadata(layout: DatasetLayout, split: str, **changes) -> None:
    path = layout.metadata_path(split)
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_the_synthetic_set_verifies_without_errors(synthetic_root: Path) -> None:
    findings = verify(synthetic_root, deep=True, progress=False)
    assert errors(findings) == []


def test_a_deleted_shard_is_named_and_breaks_the_row_count(layout: DatasetLayout) -> None:
    shard = layout.shards("train")[1]
    shard.unlink()
    findings = verify(layout.root, progress=False)
    the_finding(findings, ERROR, shard, "missing", "listed in metadata.json")
    the_finding(findings, ERROR, layout.metadata_path("train"), "total_rows is", "shard footers hold")
    the_finding(findings, WARNING, layout.metadata_path("train"), "num_shards is", "one off")


def test_a_truncated_shard_is_named(layout: DatasetLayout) -> None:
    shard = layout.shards("test")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    findings = verify(layout.root, progress=False)
    the_finding(findings, ERROR, shard, "not a readable parquet file")
    assert [f.path for f in errors(findings)] == [str(shard)]  # row totals are not checked against a broken shard


def test_every_missing_and_mistyped_column_is_named(layout: DatasetLayout) -> None:
    shard = layout.shards("train")[0]

    def stringify_213_and_drop_206(table: pa.Table) -> pa.Table:
        stringified = table.set_column(table.schema.get_field_index("213"), "213", table.column("213").cast(pa.string()))
        return stringified.drop_columns([schema.TARGET_CATE])

    rewrite_shard(shard, stringify_213_and_drop_206)
    found = errors(verify(layout.root, progress=False))
    assert {f.path for f in found} == {str(shard)} and len(found) == 2
    assert any("missing column '206' (expected int64)" in f.message for f in found)
    assert any("column '213' has type string, expected int64" in f.message for f in found)


def test_wrong_total_rows_in_metadata(layout: DatasetLayout) -> None:
    total = layout.read_metadata("test")["total_rows"]
    edit_metadata(layout, "test", total_rows=total + 1)
    the_finding(verify(layout.root, progress=False), ERROR, layout.metadata_path("test"), f"total_rows is {total + 1}", f"hold {total} rows")


def test_num_shards_one_off_is_only_a_warning_more_is_an_error(layout: DatasetLayout) -> None:
    files = len(layout.shards("train"))
    edit_metadata(layout, "train", num_shards=files + 1)
    findings = verify(layout.root, progress=False)
    assert errors(findings) == []
    the_finding(findings, WARNING, layout.metadata_path("train"), f"num_shards is {files + 1}", f"{files} shard file(s)")
    edit_metadata(layout, "train", num_shards=files + 3)
    the_finding(verify(layout.root, progress=False), ERROR, layout.metadata_path("train"), f"num_shards is {files + 3}")


def test_unreadable_metadata_is_an_error(layout: DatasetLayout) -> None:
    layout.metadata_path("train").write_text("{not json")
    the_finding(verify(layout.root, progress=False), ERROR, layout.metadata_path("train"), "not valid JSON")


def test_one_missing_split_is_a_warning_both_an_error(layout: DatasetLayout) -> None:
    shutil.rmtree(layout.split_dir("test"))
    findings = verify(layout.root, progress=False)
    assert errors(findings) == []
    the_finding(findings, WARNING, layout.split_dir("test"), "split directory missing")
    shutil.rmtree(layout.split_dir("train"))
    the_finding(verify(layout.root, progress=False), ERROR, layout.root, "no split directory")


def test_a_split_without_shards_is_an_error(layout: DatasetLayout) -> None:
    for shard in layout.shards("test"):
        shard.unlink()
    the_finding(verify(layout.root, progress=False), ERROR, layout.split_dir("test"), "no shard files")


def test_an_unsorted_feature_map(layout: DatasetLayout) -> None:
    path = layout.map_path(schema.CATE_MAP)
    keys = np.load(path)
    keys[[0, 1]] = keys[[1, 0]]
    np.save(path, keys)
    the_finding(verify(layout.root, progress=False), ERROR, path, "not sorted strictly increasing", "keys[0]")


def test_a_feature_map_containing_zero(layout: DatasetLayout) -> None:
    path = layout.map_path("213")
    np.save(path, np.sort(np.append(np.load(path), 0)))
    the_finding(verify(layout.root, progress=False), ERROR, path, "contains the ID 0")


def test_missing_maps_and_no_item_vocabulary(layout: DatasetLayout) -> None:
    user_map = layout.map_path(schema.USER)
    user_map.unlink()
    for vocab in schema.VOCABS:
        layout.map_path(schema.ITEM_MAP, vocab).unlink(missing_ok=True)
    findings = verify(layout.root, progress=False)
    the_finding(findings, ERROR, user_map, "missing")
    the_finding(findings, ERROR, layout.feature_map_dir, "no usable item vocabulary", "150_2_180_sorted_map_p90.npy")


def test_one_item_vocabulary_is_enough_and_named(layout: DatasetLayout) -> None:
    layout.map_path(schema.ITEM_MAP, "full").unlink()  # as `muse-rec download` (vocab p90) leaves it
    findings = verify(layout.root, progress=False)
    assert errors(findings) == []
    the_finding(findings, WARNING, layout.feature_map_dir, "only the p90 item vocabulary", "data.vocab=p90")


def test_scl_values_of_the_wrong_shape(layout: DatasetLayout) -> None:
    values = np.load(layout.scl_values_path)
    np.save(layout.scl_values_path, values[:-1])
    for strict in (False, True):
        the_finding(
            verify(layout.root, strict=strict, progress=False), ERROR, layout.scl_values_path,
            f"shape ({len(values)}, {schema.SCL_DIM})", f"shape ({len(values) - 1}, {schema.SCL_DIM})",
        )


def test_duplicated_scl_keys_warn_and_are_errors_when_strict(layout: DatasetLayout) -> None:
    keys = np.sort(np.load(layout.scl_keys_path))
    keys[3] = keys[2]
    np.save(layout.scl_keys_path, keys)
    findings = verify(layout.root, progress=False)
    assert errors(findings) == []
    the_finding(findings, WARNING, layout.scl_keys_path, "not sorted, unique and non-zero", "1 duplicated key(s)", "repaired at load")
    the_finding(verify(layout.root, strict=True, progress=False), ERROR, layout.scl_keys_path, "1 duplicated key(s)", "strict")


def test_an_scl_key_0_warns_and_is_an_error_when_strict(layout: DatasetLayout) -> None:
    keys, values = np.load(layout.scl_keys_path), np.load(layout.scl_values_path)
    np.save(layout.scl_keys_path, np.concatenate([[0], keys]))  # sorted and unique, but 0 means 'missing'
    np.save(layout.scl_values_path, np.concatenate([values[:1], values]))
    findings = verify(layout.root, progress=False)
    assert errors(findings) == []
    the_finding(findings, WARNING, layout.scl_keys_path, "1 key(s) 0", "keys 0 are dropped", "repaired at load")
    the_finding(verify(layout.root, strict=True, progress=False), ERROR, layout.scl_keys_path, "1 key(s) 0", "strict")


def test_bad_rows_are_found_only_by_the_deep_scan(layout: DatasetLayout) -> None:
    label_shard, sequence_shard = layout.shards("train")[0], layout.shards("test")[0]

    def two_clicks_in_row_105(table: pa.Table) -> pa.Table:
        labels = table.column(schema.LABEL).to_pylist()
        labels[105] = [1, 1]
        return table.set_column(table.schema.get_field_index(schema.LABEL), schema.LABEL, pa.array(labels, pa.list_(pa.int8())))

    def one_category_short_in_row_3(table: pa.Table) -> pa.Table:
        cates = table.column(schema.HIST_CATES).to_pylist()
        cates[3] = cates[3][:-1]
        return table.set_column(table.schema.get_field_index(schema.HIST_CATES), schema.HIST_CATES, pa.array(cates, pa.list_(pa.int64())))

    rewrite_shard(label_shard, two_clicks_in_row_105)
    rewrite_shard(sequence_shard, one_category_short_in_row_3)
    assert errors(verify(layout.root, progress=False)) == []
    findings = verify(layout.root, deep=True, progress=False)
    the_finding(findings, ERROR, label_shard, "row group 1, row 5", "one-hot", "[1, 1]")
    the_finding(findings, ERROR, sequence_shard, "row group 0, row 3", "aligned")
    assert len(errors(findings)) == 2


def test_everything_wrong_is_reported_at_once(layout: DatasetLayout) -> None:
    shard = layout.shards("train")[-1]
    shard.write_bytes(b"PAR1 not really")
    layout.metadata_path("test").unlink()
    layout.scl_keys_path.unlink()
    layout.map_path("130_1").write_bytes(b"not an array")
    findings = verify(layout.root, progress=False)
    assert {f.path for f in errors(findings)} == {
        str(shard), str(layout.metadata_path("test")), str(layout.scl_keys_path), str(layout.map_path("130_1"))
    }
