"""`prepare` against hand computation on the real demo rows, a round trip of the synthetic set, and bad input.

The expected outputs are computed here from the raw tables with plain Python (sets, Counters, dicts),
independently of the vectorised code under test.
"""
from __future__ import annotations

import itertools
import re
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from muse_rec.batch import ID_FEATURES, SCL_FEATURES, SEQUENCE_FEATURES
from muse_rec.config import DataConfig
from muse_rec.data import schema
from muse_rec.data.atomic import MARKER, PARTIAL_SUFFIX
from muse_rec.data.layout import SPLITS, DatasetLayout
from muse_rec.data import prepare as prepare_module
from muse_rec.data.loader import ShardDataset
from muse_rec.data.prepare import RAW_SCHEMAS, IdCounter, RawTable, prepare
from muse_rec.errors import ConfigError, DataError
from tests.conftest import SMALL_SYNTH
from tests.data.test_atomic import failing_swap, sweep_swap_failures, visible

USER_A, USER_B = -587594303343277051, -5124604129084675105  # the users of the demo's train samples
TEST_USER = -5343151251631757820  # the user of the demo's test samples
ABSENT_USERS = (777, 555)  # the second sorts first: the unmatched must still come in sample order


# -- raw tables as Python rows ---------------------------------------------------------------------
def raw_rows(raw: Path, name: str) -> list[dict]:
    return pq.read_table(raw / f"{name}.parquet").to_pylist()


def write_rows(raw: Path, name: str, rows: list[dict], row_group_size: int = 10) -> None:
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMAS[name])
    pq.write_table(table, raw / f"{name}.parquet", row_group_size=row_group_size)


def edit_rows(raw: Path, name: str, edit: Callable[[list[dict]], None], row_group_size: int = 10) -> None:
    rows = raw_rows(raw, name)
    edit(rows)
    write_rows(raw, name, rows, row_group_size)


def copy_raw(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for name in RAW_SCHEMAS:
        shutil.copyfile(source / f"{name}.parquet", destination / f"{name}.parquet")
    return destination


# -- the expected outputs, by hand -----------------------------------------------------------------
def vocab(*id_lists) -> list[int]:
    return sorted(set(itertools.chain(*id_lists)) - {0})


def expected_maps(raw: Path) -> dict[str, list[int]]:
    users = raw_rows(raw, "train_user_features")
    items = raw_rows(raw, "item_features")
    history = [i for u in users for i in u[schema.HIST_ITEMS]]
    return {
        schema.USER: vocab(u[schema.USER] for u in users),
        **{name: vocab(u[name] for u in users) for name in schema.USER_ATTRS},
        schema.ITEM_MAP: vocab(history, (i[schema.TARGET_ITEM] for i in items)),
        schema.CATE_MAP: vocab((c for u in users for c in u[schema.HIST_CATES]), (i[schema.TARGET_CATE] for i in items)),
        **{name: vocab(i[name] for i in items) for name in schema.ITEM_ATTRS},
    }


def expected_coverage_map(raw: Path, coverage: float) -> list[int]:
    """History items down to the count where the most frequent first cover `coverage`, plus every target."""
    counts = Counter(i for u in raw_rows(raw, "train_user_features") for i in u[schema.HIST_ITEMS] if i != 0)
    total, running = sum(counts.values()), 0
    for cut in sorted(counts.values(), reverse=True):
        running += cut
        if running >= coverage * total:
            break
    targets = (i[schema.TARGET_ITEM] for i in raw_rows(raw, "item_features"))
    return vocab((item for item, n in counts.items() if n >= cut), targets)


def expected_scl(raw: Path) -> dict[int, list[int]]:
    """Key -> vector, the first row of a repeated key winning, key 0 dropped."""
    first: dict[int, list[int]] = {}
    for row in raw_rows(raw, "scl_embedding_int8_p90"):
        if row[schema.TARGET_ITEM] != 0:
            first.setdefault(row[schema.TARGET_ITEM], row[schema.SCL_TARGET])
    return first


def brute_force_join(raw: Path, split: str) -> list[dict]:
    """Samples LEFT JOIN users LEFT JOIN items, grouped by user in user-table order, then the unmatched."""
    users: dict[int, dict] = {}
    for user in raw_rows(raw, f"{split}_user_features"):
        users.setdefault(user[schema.USER], user)
    items: dict[int, dict] = {}
    for item in raw_rows(raw, "item_features"):
        items.setdefault(item[schema.TARGET_ITEM], item)
    samples = raw_rows(raw, f"{split}_samples")
    no_user = {name: 0 for name in schema.USER_ATTRS} | {schema.HIST_ITEMS: [], schema.HIST_CATES: []}
    no_item = {name: 0 for name in (schema.TARGET_CATE, *schema.ITEM_ATTRS)}

    def joined(sample: dict) -> dict:
        user = {k: v for k, v in users.get(sample[schema.USER], no_user).items() if k != schema.USER}
        item = {k: v for k, v in items.get(sample[schema.TARGET_ITEM], no_item).items() if k != schema.TARGET_ITEM}
        return {name: (sample | user | item)[name] for name in schema.JOINED_SCHEMA.names}

    rows = [joined(s) for user in users for s in samples if s[schema.USER] == user]
    return rows + [joined(s) for s in samples if s[schema.USER] not in users]


def joined_rows(out: Path, split: str) -> list[dict]:
    return [row for shard in DatasetLayout(out).shards(split) for row in pq.read_table(shard).to_pylist()]


def check_against_raw(raw: Path, out: Path, coverage: float) -> None:
    """Every output of `prepare(raw, out, coverage)` equals what the raw tables give by hand."""
    layout = DatasetLayout(out)
    for name, keys in expected_maps(raw).items():
        written = np.load(layout.map_path(name, "full"))
        assert written.dtype == np.int64 and written.tolist() == keys, name
    assert np.load(layout.map_path(schema.ITEM_MAP, "p90")).tolist() == expected_coverage_map(raw, coverage)
    scl = expected_scl(raw)
    keys, values = np.load(layout.scl_keys_path), np.load(layout.scl_values_path)
    assert keys.tolist() == sorted(scl)
    assert values.dtype == np.int8 and values.tolist() == [scl[k] for k in sorted(scl)]
    for split in SPLITS:
        expected = brute_force_join(raw, split)
        assert joined_rows(out, split) == expected, split
        meta = layout.read_metadata(split)
        assert meta["total_rows"] == len(expected) and meta["coverage"] == coverage


# -- the real demo rows ----------------------------------------------------------------------------
def test_demo_tables_give_the_maps_scl_and_rows_computed_by_hand(demo_dir: Path, tmp_path: Path) -> None:
    summary = prepare(demo_dir, tmp_path, progress=False)
    check_against_raw(demo_dir, tmp_path, 0.9)
    # The demo's ten user rows are not the users of its ten samples: every row is a left-join miss.
    for split in SPLITS:
        sample_users = {r[schema.USER] for r in raw_rows(demo_dir, f"{split}_samples")}
        assert not sample_users & {r[schema.USER] for r in raw_rows(demo_dir, f"{split}_user_features")}
        rows = joined_rows(tmp_path, split)
        assert len(rows) == 10 and all(r[schema.HIST_ITEMS] == r[schema.HIST_CATES] == [] for r in rows)
        assert all(r[name] == 0 for r in rows for name in (*schema.USER_ATTRS, schema.TARGET_CATE, *schema.ITEM_ATTRS))
        assert summary["splits"][split]["samples_without_user"] == 10
    assert len(np.load(DatasetLayout(tmp_path).map_path(schema.ITEM_MAP))) > 5000  # ten 1000-long histories


def make_matching_raw(demo_dir: Path, raw: Path) -> Path:
    """Demo rows re-keyed so the joins hit: user rows carry the sample users (out of sample order, each
    repeated: in the same row group and in a later one), items the sample targets (one repeated), two
    samples' users are absent, SCL vectors key two targets and two recent behaviours (the keys stay
    unsorted); small row groups."""
    copy_raw(demo_dir, raw)
    train_targets = [r[schema.TARGET_ITEM] for r in raw_rows(raw, "train_samples")]
    test_targets = [r[schema.TARGET_ITEM] for r in raw_rows(raw, "test_samples")]

    def rekey(column: str, keys: dict[int, int]) -> Callable[[list[dict]], None]:
        def edit(rows: list[dict]) -> None:
            for index, key in keys.items():
                rows[index][column] = key

        return edit

    edit_rows(raw, "train_user_features", rekey(schema.USER, {2: USER_B, 4: USER_A, 5: USER_A, 7: USER_B}), row_group_size=3)
    edit_rows(raw, "test_user_features", rekey(schema.USER, {3: TEST_USER}), row_group_size=4)
    edit_rows(raw, "train_samples", rekey(schema.USER, dict(zip((1, 4), ABSENT_USERS))), row_group_size=4)
    items = dict(enumerate(train_targets[:6] + test_targets[:3] + train_targets[:1]))
    edit_rows(raw, "item_features", rekey(schema.TARGET_ITEM, items), row_group_size=4)
    users = {split: raw_rows(raw, f"{split}_user_features") for split in SPLITS}
    behaviours = [users["train"][4][schema.HIST_ITEMS][-1], users["test"][3][schema.HIST_ITEMS][-2]]
    scl_keys = dict(zip((1, 4, 6, 8), [train_targets[2], test_targets[0], *behaviours]))
    edit_rows(raw, "scl_embedding_int8_p90", rekey(schema.TARGET_ITEM, scl_keys), row_group_size=4)
    return raw


@pytest.fixture(scope="module")
def matching_raw(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_matching_raw(demo_dir, tmp_path_factory.mktemp("matching") / "raw")


def test_matching_demo_rows_join_users_and_items_first_row_winning(matching_raw: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        summary = prepare(matching_raw, tmp_path, coverage=0.5, rows_per_shard=4, row_group_rows=3, progress=False)
    check_against_raw(matching_raw, tmp_path, 0.5)
    train = joined_rows(tmp_path, "train")
    # user-table order: B (row 2) before A (row 4), each joining its first row only; then the absent users
    assert [r[schema.USER] for r in train] == [USER_B] * 6 + [USER_A] * 2 + list(ABSENT_USERS)
    assert train[0][schema.HIST_ITEMS] and train[-1][schema.HIST_ITEMS] == []
    users = raw_rows(matching_raw, "train_user_features")
    assert train[0][schema.HIST_ITEMS] == users[2][schema.HIST_ITEMS] != users[7][schema.HIST_ITEMS]
    assert train[6][schema.HIST_ITEMS] == users[4][schema.HIST_ITEMS] != users[5][schema.HIST_ITEMS]
    items = raw_rows(matching_raw, "item_features")
    first_target = [r for r in train if r[schema.TARGET_ITEM] == items[0][schema.TARGET_ITEM]]
    assert first_target[0][schema.TARGET_CATE] == items[0][schema.TARGET_CATE] != items[9][schema.TARGET_CATE]
    assert any(r[schema.HIST_ITEMS] for r in joined_rows(tmp_path, "test"))
    train_summary = summary["splits"]["train"]
    assert (train_summary["users"], train_summary["samples_without_user"], train_summary["repeated_user_rows"]) == (2, 2, 2)
    for words in ("repeat a user", "repeat the item ID", "SCL keys"):
        assert any(words in r.getMessage() for r in caplog.records), words
    meta = DatasetLayout(tmp_path).read_metadata("train")
    assert meta["num_shards"] == 3 and [s["rows"] for s in meta["shards"]] == [4, 4, 2]
    shard = pq.ParquetFile(DatasetLayout(tmp_path).shards("train")[0])
    assert [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)] == [3, 1]


@pytest.fixture(scope="module")
def prepared_matching(matching_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared-matching")
    prepare(matching_raw, out, coverage=0.5, rows_per_shard=4, row_group_rows=3, progress=False)
    return out


def loaded_by_hand(raw: Path, split: str, vocab: str, coverage: float, long_len: int) -> dict[str, np.ndarray]:
    """What the loader must yield for `prepare(raw)`, from the raw tables: the joined rows by brute
    force, each ID's row by searchsorted on its hand-built map (row i + 1 on a hit, else 0), the
    last `long_len` behaviours left-padded with 0, the SCL rows from the first vector of each key."""
    maps = {name: np.array(keys, np.int64) for name, keys in expected_maps(raw).items()}
    if vocab == "p90":
        maps[schema.ITEM_MAP] = np.array(expected_coverage_map(raw, coverage), np.int64)
    scl_keys = np.array(sorted(expected_scl(raw)), np.int64)

    def rows_of(keys: np.ndarray, ids: list[int]) -> list[int]:
        ids = np.array(ids, np.int64)
        at = np.searchsorted(keys, ids)
        hit = (at < len(keys)) & (keys[np.minimum(at, len(keys) - 1)] == ids)
        return np.where(hit, at + 1, 0).tolist()

    def padded(keys: np.ndarray, sequence: list[int]) -> list[int]:
        kept = sequence[-long_len:]
        return [0] * (long_len - len(kept)) + rows_of(keys, kept)

    out: dict[str, list] = {key: [] for key in (*ID_FEATURES, *SEQUENCE_FEATURES, *SCL_FEATURES, "labels", "user_ids")}
    for r in brute_force_join(raw, split):
        for column in (*ID_FEATURES, schema.TARGET_ITEM, schema.TARGET_CATE):
            out[column] += rows_of(maps[schema.MAP_OF_COLUMN[column]], [r[column]])
        out[schema.HIST_ITEMS].append(padded(maps[schema.ITEM_MAP], r[schema.HIST_ITEMS]))
        out[schema.HIST_CATES].append(padded(maps[schema.CATE_MAP], r[schema.HIST_CATES]))
        out[schema.SCL_TARGET] += rows_of(scl_keys, [r[schema.TARGET_ITEM]])
        out[schema.SCL_LONG].append(padded(scl_keys, r[schema.HIST_ITEMS]))
        out["labels"].append(r[schema.LABEL][1])
        out["user_ids"].append(r[schema.USER])
    return {key: np.array(values) for key, values in out.items()}


def loaded(root: Path, split: str, vocab: str, long_len: int) -> dict[str, np.ndarray]:
    """Every field the loader yields for the split, as (rows, ...) arrays."""
    config = DataConfig(root=str(root), vocab=vocab, long_seq_len=long_len, batch_size=4, num_workers=0)
    batches = list(ShardDataset(config, split))
    assert all((b.weights > 0).all() for b in batches)  # one rank: no padding rows
    fields: dict[str, list] = {}
    for b in batches:
        for key in (*ID_FEATURES, *SEQUENCE_FEATURES, *SCL_FEATURES):
            values = b.sequence(key).numpy()
            fields.setdefault(key, []).append(values[:, 0] if values.shape[1] == 1 else values)
        fields.setdefault("labels", []).append(b.labels.numpy())
        fields.setdefault("user_ids", []).append(b.user_ids.numpy())
    return {key: np.concatenate(values) for key, values in fields.items()}


@pytest.mark.parametrize("vocab, long_len", [("p90", 1000), ("full", 1200), ("p90", 300)])
@pytest.mark.parametrize("split", SPLITS)
def test_prepared_demo_rows_load_as_computed_by_hand_from_the_raw_tables(
    matching_raw: Path, prepared_matching: Path, split: str, vocab: str, long_len: int
) -> None:
    got, want = loaded(prepared_matching, split, vocab, long_len), loaded_by_hand(matching_raw, split, vocab, 0.5, long_len)
    for key, expected in want.items():
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
    history = [r[schema.HIST_ITEMS] for r in brute_force_join(matching_raw, split)]
    lacking = [max(long_len - len(sequence), 0) for sequence in history]
    items = got[schema.HIST_ITEMS]
    assert all((items[row, :n] == 0).all() for row, n in enumerate(lacking))  # left padding: what the sequence lacks
    short = loaded_by_hand(matching_raw, split, vocab, 0.5, 50)  # the reference's short sequence: the last 50 behaviours
    np.testing.assert_array_equal(items[:, -50:], short[schema.HIST_ITEMS])
    np.testing.assert_array_equal(got[schema.SCL_LONG][:, -50:], short[schema.SCL_LONG])
    # the demo rows exercise what they should: histories (train: also samples without a user row),
    # hits, OOV IDs read as 0 (test users; under p90, rare history items), SCL vectors found
    assert all(history) if split == "test" else any(history) and not all(history)
    assert (want[schema.USER] > 0).any() if split == "train" else (want[schema.USER] == 0).all()
    assert (want[schema.HIST_ITEMS] > 0).any() and (want[schema.TARGET_ITEM] > 0).any()
    oov = [(items[row, n:] == 0).any() for row, n in enumerate(lacking) if history[row]]  # raw demo IDs are never 0
    assert any(oov) == (vocab == "p90" or split == "test")  # test histories hold items train never saw
    assert (want[schema.SCL_TARGET] > 0).any() and (want[schema.SCL_LONG][:, -50:] > 0).any()


def test_a_rerun_starts_clean_and_writes_the_same_files(matching_raw: Path, tmp_path: Path) -> None:
    prepare(matching_raw, tmp_path / "a", rows_per_shard=4, row_group_rows=3, progress=False)
    out = tmp_path / "b"
    prepare(matching_raw, out, rows_per_shard=100, row_group_rows=50, progress=False)
    killed = DatasetLayout(out / ".prepare.partial")  # what a run killed before its swap leaves: its staged files
    killed.split_dir("train").mkdir(parents=True)
    shutil.copyfile(DatasetLayout(out).shards("train")[0], killed.shard_path("train", 7))
    prepare(matching_raw, out, rows_per_shard=4, row_group_rows=3, progress=False)
    first, second = DatasetLayout(tmp_path / "a"), DatasetLayout(out)
    for split in SPLITS:
        assert [p.name for p in second.shards(split)] == [p.name for p in first.shards(split)]
        assert joined_rows(out, split) == joined_rows(first.root, split)
    assert sorted(p.name for p in second.feature_map_dir.iterdir()) == sorted(p.name for p in first.feature_map_dir.iterdir())
    assert not list(out.rglob(f"*{PARTIAL_SUFFIX}")) and not killed.root.exists()


def test_a_rerun_failing_at_any_step_of_its_swap_leaves_the_old_or_the_new_set(demo_dir: Path, matching_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare(demo_dir, out, progress=False)
    rerun = dict(coverage=0.5, rows_per_shard=4, row_group_rows=3, progress=False)
    new = sweep_swap_failures(out, visible(out), lambda: prepare(matching_raw, out, **rerun))
    check_against_raw(matching_raw, out, 0.5)
    prepare(matching_raw, tmp_path / "fresh", **rerun)
    assert new == visible(tmp_path / "fresh")


def test_a_swap_killed_midway_is_finished_by_the_next_run_even_one_that_fails(
    demo_dir: Path, matching_raw: Path, raw: Path, tmp_path: Path
) -> None:
    """The old publish step's bug: the next run's cleanup threw the finished files away."""
    out = tmp_path / "out"
    prepare(demo_dir, out, progress=False)
    with failing_swap(fail_at=7) as steps:  # committed, train/ moved aside, test/ not yet
        with pytest.raises(DataError, match="swapping in the new data set stopped"):
            prepare(matching_raw, out, coverage=0.5, progress=False)
    assert steps.fired and not DatasetLayout(out).split_dir("train").exists()
    edit_rows(raw, "train_samples", set_cell(6, schema.LABEL, [1, 1]), 4)
    with pytest.raises(DataError, match="label_0"):  # found midway through the build: after the start
        prepare(raw, out, progress=False)
    check_against_raw(matching_raw, out, 0.5)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "train", "test", "feature_map"])


@pytest.mark.parametrize("marker", ["synth", None], ids=["synthetic", "unmarked"])
def test_another_data_set_is_refused_untouched_and_replaced_only_with_force(
    synthetic_root: Path, demo_dir: Path, tmp_path: Path, marker: str | None
) -> None:
    out = tmp_path / "out"
    shutil.copytree(synthetic_root, out)
    if marker is None:
        (out / MARKER).unlink()
    before = snapshot(out)
    with pytest.raises(DataError) as error:
        prepare(demo_dir, out, progress=False)
    held = "a data set written by `muse-rec synth`" if marker else "train/, test/, feature_map/ not written by `muse-rec prepare`"
    assert str(error.value).startswith(f"{out} holds {held}")
    assert "`muse-rec prepare` would replace train/, test/, feature_map/. Rerun with --force to replace them, or choose another --out." in str(error.value)
    assert snapshot(out) == before

    prepare(demo_dir, out, progress=False, force=True)
    check_against_raw(demo_dir, out, 0.9)
    after = snapshot(out)
    assert {name for name in after if name.startswith("raw/")} == {name for name in before if name.startswith("raw/")}  # not prepare's
    assert not [name for name, data in before.items() if not name.startswith("raw/") and after.get(name) == data]


def test_its_own_raw_input_inside_the_output_is_left_alone(demo_dir: Path, tmp_path: Path) -> None:
    raw = copy_raw(demo_dir, tmp_path / "raw")
    inputs = snapshot(raw)
    prepare(raw, tmp_path, progress=False)
    prepare(raw, tmp_path, coverage=0.5, progress=False)  # its own earlier output: no --force needed
    check_against_raw(raw, tmp_path, 0.5)
    assert snapshot(raw) == inputs and sorted(p.name for p in tmp_path.iterdir()) == sorted([MARKER, "raw", "train", "test", "feature_map"])


# -- round trip of the synthetic set ---------------------------------------------------------------
@pytest.mark.parametrize("slice_rows", [None, 7], ids=["whole-row-groups", "row-groups-read-in-slices"])
def test_the_synthetic_raw_tables_give_back_the_synthetic_set(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_rows: int | None
) -> None:
    if slice_rows:  # the real tables' row groups are far larger than a read: the slicing path must agree
        for constant in ("USER_BATCH_ROWS", "READ_BATCH_ROWS", "SCL_BATCH_ROWS"):
            monkeypatch.setattr(prepare_module, constant, slice_rows)
    c = SMALL_SYNTH
    prepare(synthetic_root / "raw", tmp_path, c.coverage, rows_per_shard=c.rows_per_shard, row_group_rows=c.row_group_rows, progress=False)
    synth, prepared = DatasetLayout(synthetic_root), DatasetLayout(tmp_path)
    maps = [(name, "full") for name in schema.FEATURE_MAPS] + [(schema.ITEM_MAP, "p90")]
    for name, vocabulary in maps:
        assert prepared.map_path(name, vocabulary).read_bytes() == synth.map_path(name, vocabulary).read_bytes(), name
    assert prepared.scl_keys_path.read_bytes() == synth.scl_keys_path.read_bytes()
    assert prepared.scl_values_path.read_bytes() == synth.scl_values_path.read_bytes()
    for split in SPLITS:
        ours, theirs = prepared.shards(split), synth.shards(split)
        assert [p.name for p in ours] == [p.name for p in theirs]
        for mine, original in zip(ours, theirs):
            assert pq.read_table(mine).equals(pq.read_table(original)), mine.name
        assert prepared.read_metadata(split)["total_rows"] == synth.read_metadata(split)["total_rows"]


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def raw(matching_raw: Path, tmp_path: Path) -> Path:
    """A private copy of the matching raw set, free to damage."""
    return copy_raw(matching_raw, tmp_path / "raw")


def assert_nothing_looks_complete(out: Path) -> None:
    """No split metadata, no temporary files; whatever carries a final name reads back whole."""
    layout = DatasetLayout(out)
    assert not any(layout.metadata_path(split).exists() for split in SPLITS)
    assert not list(out.rglob(f"*{PARTIAL_SUFFIX}"))
    for path in out.rglob("*.npy"):
        np.load(path)
    for path in out.rglob("*.parquet"):
        pq.read_table(path)


def set_cell(row: int, column: str, value) -> Callable[[list[dict]], None]:
    def edit(rows: list[dict]) -> None:
        rows[row][column] = value

    return edit


@pytest.mark.parametrize(
    "name, edit, row_group_size, message",
    [
        (
            "train_samples", set_cell(6, schema.LABEL, [1, 1]), 4,
            "train_samples.parquet, row group 1, row 2: column 'label_0' must be a 2-element one-hot",
        ),
        ("test_samples", set_cell(0, schema.LABEL, [0, 1, 0]), 4, "test_samples.parquet, row group 0, row 0: column 'label_0'"),
        (
            "test_user_features", set_cell(4, schema.HIST_CATES, [1, 2]), 3,
            "test_user_features.parquet, row group 1, row 1: '150_2_180' has 1000 behaviours but '151_2_180' has 2",
        ),
        (
            "scl_embedding_int8_p90", set_cell(3, schema.SCL_TARGET, [1] * 127), 10,
            "scl_embedding_int8_p90.parquet, row group 0, row 3: column '205_c' must hold 128 int8 values, found 127",
        ),
    ],
)
def test_bad_rows_are_named_by_file_row_group_and_row(
    raw: Path, tmp_path: Path, name: str, edit: Callable, row_group_size: int, message: str
) -> None:
    edit_rows(raw, name, edit, row_group_size)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(raw, out, progress=False)
    assert_nothing_looks_complete(out)


def test_null_sequences_and_ids_read_as_missing(raw: Path, tmp_path: Path) -> None:
    def blank(rows: list[dict]) -> None:
        rows[3] |= {schema.HIST_ITEMS: None, schema.HIST_CATES: None, "130_1": None}

    edit_rows(raw, "test_user_features", blank)
    edit_rows(raw, "item_features", set_cell(6, schema.TARGET_CATE, None))
    prepare(raw, tmp_path, progress=False)
    rows = joined_rows(tmp_path, "test")
    assert all(r[schema.HIST_ITEMS] == r[schema.HIST_CATES] == [] and r["130_1"] == 0 for r in rows)
    assert rows[0]["130_2"] == raw_rows(raw, "test_user_features")[3]["130_2"] != 0
    item = raw_rows(raw, "item_features")[6]
    of_item = [r for r in rows if r[schema.TARGET_ITEM] == item[schema.TARGET_ITEM]]
    assert [(r[schema.TARGET_CATE], r["213"]) for r in of_item] == [(0, item["213"])]


def test_slices_of_a_row_group_are_named_by_their_rows(raw: Path) -> None:
    edit_rows(raw, "train_samples", lambda rows: None, row_group_size=6)
    table = RawTable.open(raw / "train_samples.parquet", schema.RAW_SAMPLES_SCHEMA)
    wheres = [where.removeprefix(str(table.path)) for _, where in table.batches([schema.USER], 4)]
    assert wheres == [", row group 0, rows 0-3 of it", ", row group 0, rows 4-5 of it", ", row group 1"]


def test_a_missing_column_is_refused_before_anything_is_written(raw: Path, tmp_path: Path) -> None:
    path = raw / "train_user_features.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["130_3"]), path)
    with pytest.raises(DataError, match=r"train_user_features.parquet: missing column '130_3' \(expected int64\)"):
        prepare(raw, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_mistyped_column_is_refused(raw: Path, tmp_path: Path) -> None:
    path = raw / "item_features.parquet"
    table = pq.read_table(path)
    table = table.set_column(0, schema.TARGET_ITEM, pc.cast(table[schema.TARGET_ITEM], pa.float64(), safe=False))
    pq.write_table(table, path)
    with pytest.raises(DataError, match="item_features.parquet: column '205' has type double, expected int64"):
        prepare(raw, tmp_path / "out", progress=False)


def test_a_truncated_file_is_refused(raw: Path, tmp_path: Path) -> None:
    path = raw / "test_user_features.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="test_user_features.parquet: not a readable parquet file"):
        prepare(raw, tmp_path / "out", progress=False)


def test_a_corrupt_page_is_named_by_file_and_row_group(raw: Path, tmp_path: Path) -> None:
    path = raw / "train_user_features.parquet"
    page = pq.ParquetFile(path).metadata.row_group(1).column(6).data_page_offset  # 150_2_180 of row group 1
    damaged = bytearray(path.read_bytes())
    damaged[page : page + 40] = b"\xff" * 40  # the page header no longer decodes
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="train_user_features.parquet, row group 1: not readable"):
        prepare(raw, tmp_path / "out", progress=False)
    assert_nothing_looks_complete(tmp_path / "out")


def write_scl(raw: Path, keys: list[int]) -> np.ndarray:
    vectors = np.random.default_rng(0).integers(-127, 128, (len(keys), schema.SCL_DIM)).astype(np.int8)
    rows = [{schema.TARGET_ITEM: k, schema.SCL_TARGET: v.tolist()} for k, v in zip(keys, vectors)]
    write_rows(raw, "scl_embedding_int8_p90", rows, row_group_size=2)
    return vectors


def test_repeated_and_unsorted_scl_keys_are_sorted_first_row_winning(raw: Path, tmp_path: Path, caplog) -> None:
    vectors = write_scl(raw, [30, 10, 30, 20, 0, 10])
    with caplog.at_level(logging.WARNING):
        summary = prepare(raw, tmp_path, progress=False)
    layout = DatasetLayout(tmp_path)
    assert np.load(layout.scl_keys_path).tolist() == [10, 20, 30]
    assert np.array_equal(np.load(layout.scl_values_path), vectors[[1, 3, 0]])
    assert summary["scl"] == {"rows_in": 6, "rows": 3, "repeated_keys": 2, "zero_keys": 1, "sorted": False}
    assert any("2 repeated key(s) and 1 key(s) 0" in r.getMessage() for r in caplog.records)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under `out` by relative path, with its bytes."""
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "damage, message, options",
    [
        (  # found while reading the samples, after the SCL arrays are written
            lambda raw: edit_rows(raw, "train_samples", set_cell(6, schema.LABEL, [1, 1]), 4),
            "train_samples.parquet, row group 1, row 2: column 'label_0' must be a 2-element one-hot", {},
        ),
        (
            lambda raw: write_scl(raw, [10, 20, 20, 30]),
            "1 repeated key.*refused because strict checking is on", {"strict": True},
        ),
        (  # found midway through the test join: both splits' first shard is open, the train maps written
            lambda raw: edit_rows(raw, "test_user_features", set_cell(9, schema.HIST_ITEMS, []), 4),
            "test_user_features.parquet, row group 2, row 1", {"rows_per_shard": 100, "row_group_rows": 3},
        ),
    ],
    ids=["bad-label", "strict-scl", "bad-sequence-midway"],
)
def test_a_failing_rerun_leaves_the_earlier_data_set_intact(raw: Path, tmp_path: Path, damage, message: str, options: dict) -> None:
    out = tmp_path / "out"
    prepare(raw, out, progress=False)
    before = snapshot(out)
    damage(raw)
    with pytest.raises(DataError, match=message):
        prepare(raw, out, progress=False, **options)
    assert snapshot(out) == before  # every file as it was, and no staging or temporary file left
    assert len(list(ShardDataset(DataConfig(root=str(out), batch_size=4, num_workers=0), "train"))) == 3


def test_a_coverage_outside_zero_one_is_refused(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coverage"):
        prepare(raw, tmp_path, coverage=1.5, progress=False)


def test_id_counter_merges_partial_counts_exactly() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.integers(-40, 40, rng.integers(0, 30)) for _ in range(60)]
    counter = IdCounter(min_pending=8)  # merges many times along the way
    for part in parts:
        counter.add(part)
    ids, counts = counter.result()
    expected = Counter(int(i) for part in parts for i in part if i != 0)
    assert dict(zip(ids.tolist(), counts.tolist())) == expected and ids.tolist() == sorted(expected)


def test_raw_item_content_is_checked_sorted_and_carried_into_the_feature_maps(synthetic_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_root / "raw", raw)
    content = pq.read_table(DatasetLayout(synthetic_root).item_content_path)
    shuffled = content.take(np.random.default_rng(0).permutation(content.num_rows))
    pq.write_table(shuffled, raw / "item_content.parquet")
    summary = prepare(raw, tmp_path / "out", progress=False)
    assert summary["item_content"] == {"items": content.num_rows, "fields": [schema.TITLE_TOKENS]}
    assert pq.read_table(DatasetLayout(tmp_path / "out").item_content_path).equals(content)

    pq.write_table(pa.concat_tables([shuffled, shuffled.slice(0, 1)]), raw / "item_content.parquet")
    with pytest.raises(DataError, match=r"item_content.parquet: column 205 has duplicated item IDs"):
        prepare(raw, tmp_path / "again", progress=False)
