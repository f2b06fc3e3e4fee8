"""The loader: every field of every row against an independent dict-based reference, the work split
over ranks and workers, resuming, and each kind of bad input."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from muse_rec.batch import ID_FEATURES, SCL_FEATURES, SEQUENCE_FEATURES, Batch, BatchLayout, batch_layout
from muse_rec.config import DataConfig, ModelConfig
from muse_rec.data import schema
from muse_rec.data.atomic import save_npy, write_json
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import (
    ReadAhead,
    ShardDataset,
    batch_order,
    decode_reference,
    decode_rows,
    make_dataloader,
    plan_rank,
    list_row_groups,
)
from muse_rec.errors import DataError
from muse_rec.model import gsu
from tests.data.handmade import make_dataset, make_rows, write_maps

L = 8  # short sequences keep hand checks readable; rows have up to 12 behaviours (truncation)


def config(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), vocab=kw.pop("vocab", "p90"), long_seq_len=L, batch_size=kw.pop("batch_size", 7), num_workers=0, **kw)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> tuple[Path, list[dict]]:
    rows = make_rows(40, seed=3)
    return make_dataset(tmp_path_factory.mktemp("handmade"), rows), rows


def expected_rows(root: Path, rows: list[dict], vocab: str) -> dict[str, np.ndarray]:
    """What the loader must produce, computed with Python dicts straight from the rows."""
    layout = DatasetLayout(root)

    def lookup(path: Path):
        keys = np.load(path).tolist()
        return {k: i + 1 for i, k in enumerate(keys)}

    maps = {f: lookup(layout.map_path(f, vocab)) for f in schema.FEATURE_MAPS}
    scl_keys = np.load(layout.scl_keys_path).tolist()
    scl = {k: i + 1 for i, k in enumerate(scl_keys)}

    def pad(seq):
        seq = seq[-L:]
        return [0] * (L - len(seq)) + seq

    out = {key: [] for key in (*ID_FEATURES, *SEQUENCE_FEATURES, *SCL_FEATURES, "labels", "user_ids")}
    for r in rows:
        for c in (*ID_FEATURES, schema.TARGET_ITEM, schema.TARGET_CATE):
            out[c].append(maps[schema.MAP_OF_COLUMN[c]].get(r[c], 0))
        items, cates = pad(r[schema.HIST_ITEMS]), pad(r[schema.HIST_CATES])
        out[schema.HIST_ITEMS].append([maps[schema.ITEM_MAP].get(x, 0) for x in items])
        out[schema.HIST_CATES].append([maps[schema.CATE_MAP].get(x, 0) for x in cates])
        out[schema.SCL_TARGET].append(scl.get(r[schema.TARGET_ITEM], 0))
        out[schema.SCL_LONG].append([scl.get(x, 0) for x in items])
        out["labels"].append(r[schema.LABEL][1])
        out["user_ids"].append(r[schema.USER])
    return {k: np.array(v) for k, v in out.items()}


def flatten(batches: list[Batch], real_only: bool = True) -> dict[str, np.ndarray]:
    """Every field of a list of batches as (rows, ...) arrays."""
    out: dict[str, list] = {}
    for b in batches:
        keep = (b.weights > 0).numpy() if real_only else np.ones(b.batch_size, bool)
        fields = {
            **{k: b.sequence(k) for k in ID_FEATURES},
            **{k: b.sequence(k) for k in SEQUENCE_FEATURES},
            **{k: b.sequence(k) for k in SCL_FEATURES},
        }
        fields = {k: v.squeeze(1) if v.shape[1] == 1 else v for k, v in fields.items()}
        fields |= {"labels": b.labels, "user_ids": b.user_ids, "weights": b.weights}
        for k, v in fields.items():
            out.setdefault(k, []).append(v.numpy()[keep])
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("vocab,decode_rows", [("p90", 1024), ("full", 1024), ("p90", 3)])
def test_every_field_of_every_row_matches_the_reference(handmade, vocab, decode_rows):
    """decode_rows 3: row groups of 16 streamed in chunks that split users' impressions and batches."""
    root, rows = handmade
    batches = list(ShardDataset(config(root, vocab=vocab, decode_rows=decode_rows), "train"))
    got, want = flatten(batches), expected_rows(root, rows, vocab)
    for key, expected in want.items():
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
    # the hand-made data exercises what it should: OOV, 0, truncation, padding, missing SCL
    assert (want[schema.USER] == 0).any() and (want[schema.HIST_ITEMS] == 0).any()
    assert any(len(r[schema.HIST_ITEMS]) > L for r in rows) and any(len(r[schema.HIST_ITEMS]) == 0 for r in rows)
    assert (want[schema.SCL_TARGET] == 0).any() and (want[schema.SCL_TARGET] > 0).any()


def test_batches_hold_each_distinct_history_once_and_move_like_pipelineable(handmade):
    root, _ = handmade
    batches = list(ShardDataset(config(root), "train"))
    for batch in batches:
        size, u = batch.batch_size, batch.num_histories
        history = [L] * u + [0] * (size - u)  # the first U rows hold the distinct histories
        assert batch.sequence_features.keys() == list(SEQUENCE_FEATURES)
        assert batch.sequence_features.lengths().tolist() == [1] * 2 * size + history * 2
        assert batch.scl_features.lengths().tolist() == [1] * size + history
        assert sorted(set(batch.history_of_row.tolist())) == list(range(u))  # each history serves an impression
        assert len(set(zip(batch.history_of_row.tolist(), batch.user_ids.tolist()))) == u  # and one user's
        assert batch.sequence(schema.SCL_LONG).shape == (size, L)
    assert sum(b.num_histories for b in batches) < sum(b.batch_size for b in batches)  # users have several impressions
    batch = batches[0]
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.sequence_features.values(), batch.sequence_features.values())
    assert torch.equal(moved.history_of_row, batch.history_of_row) and moved.num_histories == batch.num_histories


def test_without_the_scl_sequence_only_the_target_scl_row_is_assembled(handmade):
    """For a model that reads no SCL sequence (lemur, history from the bank): everything else equal."""
    root, _ = handmade
    full = next(iter(ShardDataset(config(root), "train")))
    lean = next(iter(ShardDataset(config(root), "train", layout=BatchLayout(scl_features=(schema.SCL_TARGET,)))))
    assert lean.scl_features.keys() == [schema.SCL_TARGET]
    assert torch.equal(lean.scl_features[schema.SCL_TARGET].values(), full.scl_features[schema.SCL_TARGET].values())
    assert lean.scl_features.lengths().tolist() == [1] * 7
    assert torch.equal(lean.sequence_features.values(), full.sequence_features.values())
    assert torch.equal(lean.id_features.values(), full.id_features.values())


# -- the GSU in the loader (model.gsu_stage loader) -----------------------------------------------
COSINE_TOLERANCE = schema.SCL_DIM * np.finfo(np.float32).eps
"""A float32 dot product of two unit vectors of 128 terms (the reference's normalise-then-multiply)
is within d x eps of the exact cosine, which the loader computes from exact integer products."""


def reference_gsu(full: Batch, values: np.ndarray, method: str, k: int, short: int) -> dict[str, torch.Tensor]:
    """What the loader's GSU must give, by `muse_rec.model.gsu`'s plain functions on a whole-sequence
    batch. The positions follow the exact cosines (`gsu.scl_cosines`), as both GSU stages do: the
    reference's normalise-then-multiply order of equal cosines depends on rounding."""
    table = torch.cat([torch.zeros(1, schema.SCL_DIM), torch.from_numpy(np.array(values, np.float32))])
    items, cates = (full.sequence(key) for key in (schema.HIST_ITEMS, schema.HIST_CATES))
    target = table[full.sequence(schema.SCL_TARGET)[:, 0]]
    sequence = table[full.sequence(schema.SCL_LONG)]
    cosines = gsu.cosine(target.unsqueeze(1), sequence)
    out = {"short_cosines": cosines[:, -short:], schema.SHORT_ITEMS: items[:, -short:], schema.SHORT_CATES: cates[:, -short:]}
    if method == "sim_soft":
        return {"top_cosines": cosines, "short_cosines": cosines[:, -short:]}
    if method == "din":
        return out
    if method == "muse":
        positions = gsu.top_k_positions(gsu.scores_of(gsu.scl_cosines(target, sequence)), k)
        valid = torch.ones(len(items), k, dtype=torch.bool)
    else:
        positions, valid = gsu.sim_hard_positions(cates, full.sequence(schema.TARGET_CATE)[:, 0], k)
    kept = {schema.TOP_ITEMS: items, schema.TOP_CATES: cates, "top_cosines": cosines}
    return out | {key: gsu.gather_positions(value, positions) * valid for key, value in kept.items()}


@pytest.mark.parametrize("method", ["muse", "sim_hard", "din", "sim_soft"])
@pytest.mark.parametrize("data", ["handmade", "handmade in chunks of 5 rows", "synthetic"])
def test_loader_gsu_equals_the_model_reference(handmade, synthetic_root, method, data):
    """Ties, pads, items and targets without SCL vector, OOV IDs and truncated histories (handmade;
    in chunks of 5 rows, a user's history split between chunks), fewer matches than K (sim_hard)
    and real 1000-long histories (synthetic)."""
    root, long_len, k = (synthetic_root, 1000, 50) if data == "synthetic" else (handmade[0], L, 3)
    cfg = dataclasses.replace(config(root, batch_size=64, decode_rows=5 if "chunks" in data else 1024), long_seq_len=long_len)
    model = ModelConfig(method=method, keep_top=k, short_seq_len=min(50, long_len - 2))
    layout = batch_layout(model)
    maps = FeatureMaps.load(DatasetLayout(root), "p90")
    for full, lean in zip(ShardDataset(cfg, "train", maps=maps), ShardDataset(cfg, "train", maps=maps, layout=layout)):
        want = reference_gsu(full, maps.scl.values, method, k, model.short_seq_len)
        assert lean.scl_features is None and list(lean.sequence_features.keys()) == list(layout.sequence_lengths(long_len))
        for key, expected in want.items():
            got = getattr(lean, key) if key.endswith("cosines") else lean.sequence(key)
            if key.endswith("cosines"):
                torch.testing.assert_close(got, expected.float(), rtol=0, atol=COSINE_TOLERANCE, msg=lambda m: f"{key}: {m}")
            else:
                assert torch.equal(got, expected), key
        assert torch.equal(lean.id_features.values(), full.id_features.values())
        assert torch.equal(lean.labels, full.labels) and torch.equal(lean.user_ids, full.user_ids)


def test_fast_decode_equals_the_row_by_row_definition(handmade, synthetic_root):
    for root, long_len in ((handmade[0], L), (synthetic_root, 1000)):
        layout = DatasetLayout(root)
        maps = FeatureMaps.load(layout, "p90")
        for group in list_row_groups(layout, "train")[:4]:
            table = pq.ParquetFile(group.path).read_row_group(group.index)
            fast, slow = decode_rows(table, maps, long_len, "x"), decode_reference(table, maps, long_len)
            for field in dataclasses.fields(fast):
                if field.name == "sequence_of_row":
                    continue
                a, b = getattr(fast, field.name), getattr(slow, field.name)
                if field.name in ("items", "cates", "scl"):
                    a, b = a[fast.sequence_of_row], b[slow.sequence_of_row]
                np.testing.assert_array_equal(a, b, err_msg=field.name)
            assert len(fast.items) < len(table)  # denormalised rows share one decoded sequence


def test_rows_of_one_user_with_different_sequences_are_kept_apart(tmp_path):
    rows = make_rows(3, seed=1, impressions=(3, 4))
    rows[1] = {**rows[1], schema.HIST_ITEMS: rows[1][schema.HIST_ITEMS][::-1] or [9], schema.HIST_CATES: rows[1][schema.HIST_CATES][::-1] or [1]}
    make_dataset(tmp_path, rows)
    got, want = flatten(list(ShardDataset(config(tmp_path), "train"))), expected_rows(tmp_path, rows, "p90")
    np.testing.assert_array_equal(got[schema.HIST_ITEMS], want[schema.HIST_ITEMS])


@pytest.mark.parametrize("split", ["train", "test"])
def test_synthetic_round_trip_of_every_field(synthetic_root, split):
    layout = DatasetLayout(synthetic_root)
    rows = [r for path in layout.shards(split) for r in pq.read_table(path).to_pylist()]
    cfg = dataclasses.replace(config(synthetic_root, batch_size=64), long_seq_len=1000)
    got = flatten(list(ShardDataset(cfg, split)))
    global L
    saved, L = L, 1000
    try:
        want = expected_rows(synthetic_root, rows, "p90")
    finally:
        L = saved
    for key, expected in want.items():
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
    if split == "train":  # train users are in the vocabulary: the user rows are real lookups, not all OOV
        assert (want[schema.USER] > 0).all()


# -- work split ------------------------------------------------------------------------------------
def uneven_dataset(root: Path) -> list[dict]:
    """90 rows in three shards of 7, 61 and 22 rows, in row groups of 5, 16 and 22 rows.

    The maps cover every row's target and targets are unique, so the targets read identify the
    rows: one row read twice and another dropped would change them.
    """
    rows = make_rows(30, seed=5, impressions=(1, 6))
    assert len(rows) == 90
    write_maps(root, rows)
    layout = DatasetLayout(root)
    layout.split_dir("train").mkdir()
    parts = [(rows[:7], 5), (rows[7:68], 16), (rows[68:], 22)]
    for i, (part, group) in enumerate(parts):
        table = pa.Table.from_pylist(part, schema=schema.JOINED_SCHEMA)
        pq.write_table(table, layout.shard_path("train", i), row_group_size=group)
    write_json(layout.metadata_path("train"), {"total_rows": len(rows), "num_shards": len(parts)})
    return rows


def unique_targets(root: Path, rows: list[dict]) -> list[int]:
    """The target item row of each row, checked to tell the rows apart (none OOV, none repeated)."""
    targets = expected_rows(root, rows, "p90")[schema.TARGET_ITEM].tolist()
    assert 0 not in targets and len(set(targets)) == len(rows)
    return targets


@pytest.mark.parametrize(
    "world_size,num_workers,batch_size,decode_rows", [(2, 2, 7, 1024), (2, 2, 45, 1024), (3, 2, 5, 1024), (2, 0, 46, 1024), (3, 2, 5, 4)]
)
def test_uneven_shards_give_every_rank_the_same_steps_and_lose_no_row(tmp_path, world_size, num_workers, batch_size, decode_rows):
    rows = uneven_dataset(tmp_path)
    per_rank = []
    for rank in range(world_size):
        dataset = ShardDataset(config(tmp_path, batch_size=batch_size, decode_rows=decode_rows), "train", rank, world_size)
        batches = list(make_dataloader(dataset, num_workers=num_workers))
        assert len(batches) == len(dataset)
        per_rank.append(batches)
    sizes = [[b.batch_size for b in batches] for batches in per_rank]
    assert all(s == sizes[0] for s in sizes), sizes  # same steps, same size at every step
    targets = np.concatenate([flatten(batches)[schema.TARGET_ITEM] for batches in per_rank])
    assert sorted(targets.tolist()) == sorted(unique_targets(tmp_path, rows))  # every row exactly once
    padded = [flatten(batches, real_only=False) for batches in per_rank]
    assert all(((p["weights"] == 0) <= (p["labels"] == 0)).all() for p in padded)


def test_plan_pads_only_the_last_step_and_only_by_one_row():
    from muse_rec.data.loader import RowGroup

    groups = (RowGroup(Path("a"), 0, 0, 21),)
    spans = lambda plan: [(b.start, b.stop, b.padding) for b in plan.batches]  # noqa: E731
    plans = [plan_rank(groups, 5, r, 2) for r in range(2)]  # ranks read 10 and 11 rows
    assert spans(plans[0]) == [(0, 5, 0), (5, 10, 0), (10, 10, 1)]  # one weight-0 copy of row 9
    assert spans(plans[1]) == [(10, 15, 0), (15, 20, 0), (20, 21, 0)]
    plans = [plan_rank(groups, 4, r, 2) for r in range(2)]
    assert spans(plans[0]) == [(0, 4, 0), (4, 8, 0), (8, 10, 1)]
    assert spans(plans[1]) == [(10, 14, 0), (14, 18, 0), (18, 21, 0)]
    with pytest.raises(DataError, match="cannot give each of 30 ranks"):
        plan_rank(groups, 5, 0, 30)


def test_batch_order_interleaves_worker_blocks():
    assert batch_order(5, 2).tolist() == [0, 3, 1, 4, 2]
    assert batch_order(4, 1).tolist() == [0, 1, 2, 3]
    assert sorted(batch_order(11, 3).tolist()) == list(range(11))


@pytest.mark.parametrize("num_workers,decode_rows", [(0, 1024), (2, 1024), (0, 4), (2, 4)])
def test_resuming_at_a_step_yields_exactly_the_rest_in_order(tmp_path, num_workers, decode_rows):
    """decode_rows 4: a resumed run or a worker starts inside a row group, behind its stream."""
    rows = uneven_dataset(tmp_path)
    cfg = config(tmp_path, batch_size=6, decode_rows=decode_rows)
    full = [flatten([b])[schema.TARGET_ITEM].tolist() for b in make_dataloader(ShardDataset(cfg, "train"), num_workers)]
    assert sorted(itertools.chain(*full)) == sorted(unique_targets(tmp_path, rows))  # batches tell rows apart
    for start in (1, 5, len(full) - 1):
        resumed = make_dataloader(ShardDataset(cfg, "train", start_step=start), num_workers)
        assert [flatten([b])[schema.TARGET_ITEM].tolist() for b in resumed] == full[start:]


# -- bad input -------------------------------------------------------------------------------------
def rewrite_shard(root: Path, change) -> Path:
    path = DatasetLayout(root).shard_path("train", 0)
    pq.write_table(change(pq.read_table(path)), path)
    return path


@pytest.fixture
def copy(handmade, tmp_path) -> Path:
    shutil.copytree(handmade[0], tmp_path / "data")
    return tmp_path / "data"


def read_all(root: Path, **kw) -> list[Batch]:
    return list(ShardDataset(config(root, **kw), "train"))


def test_missing_column_is_named(copy):
    path = rewrite_shard(copy, lambda t: t.drop_columns([schema.HIST_CATES]))
    with pytest.raises(DataError, match=rf"{path}: missing column '151_2_180'"):
        read_all(copy)


def test_mistyped_column_is_named(copy):
    path = rewrite_shard(copy, lambda t: t.set_column(t.schema.get_field_index("205"), "205", t.column("205").cast(pa.string())))
    with pytest.raises(DataError, match=rf"{path}: column '205' has type string, expected int64"):
        read_all(copy)


@pytest.mark.parametrize("decode_rows", [1024, 2])  # 2: row 3 is the second row of a chunk; the error names it in its row group
@pytest.mark.parametrize("label,found", [([1, 1], r"\[1, 1\]"), ([0, 1, 0], r"\[0, 1, 0\]"), ([2, -1], r"\[2, -1\]")])
def test_label_that_is_not_one_hot_is_located(copy, label, found, decode_rows):
    def change(t):
        labels = t.column(schema.LABEL).to_pylist()
        labels[3] = label
        return t.set_column(0, schema.LABEL, pa.array(labels, pa.list_(pa.int8())))

    path = rewrite_shard(copy, change)
    with pytest.raises(DataError, match=rf"{path}, row group 0, row 3: column 'label_0' must be a 2-element one-hot .* found {found}"):
        read_all(copy, decode_rows=decode_rows)


@pytest.mark.parametrize("decode_rows", [1024, 3])
def test_sequences_of_different_lengths_are_located(copy, decode_rows):
    def change(t):
        cates = t.column(schema.HIST_CATES).to_pylist()
        cates[20] = cates[20] + [1]
        index = t.schema.get_field_index(schema.HIST_CATES)
        return t.set_column(index, schema.HIST_CATES, pa.array(cates, pa.list_(pa.int64())))

    path = rewrite_shard(copy, change)
    with pytest.raises(DataError, match=rf"{path}, row group 0, row 20: .150_2_180. has \d+ behaviours but '151_2_180' has \d+"):
        read_all(copy, decode_rows=decode_rows)


def test_truncated_parquet_file_is_named(copy):
    path = DatasetLayout(copy).shard_path("train", 1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        read_all(copy)


def test_corrupt_row_group_is_named(copy):
    path = DatasetLayout(copy).shard_path("train", 0)
    data = bytearray(path.read_bytes())
    data[200:1200] = bytes(1000)  # inside the first row group's pages, footer intact
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path}, row group 0"):
        read_all(copy)


def test_empty_data_directory(tmp_path, handmade):
    shutil.copytree(handmade[0] / "feature_map", tmp_path / "feature_map")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"train: no shards found \(expected train-shard-NNNNNN.parquet files\)"):
        read_all(tmp_path)


@pytest.mark.parametrize("exists", [True, False])
def test_a_truly_empty_or_missing_data_directory_is_named(tmp_path, exists):
    root = tmp_path / "data"
    if exists:
        root.mkdir()
    words = "empty data directory" if exists else "data directory missing"
    with pytest.raises(DataError, match=rf"{root}: {words}.*muse-rec download"):
        read_all(root)


def test_shards_without_row_groups_are_refused(tmp_path, handmade):
    shutil.copytree(handmade[0] / "feature_map", tmp_path / "feature_map")
    layout = DatasetLayout(tmp_path)
    layout.split_dir("train").mkdir()
    pq.ParquetWriter(layout.shard_path("train", 0), schema.JOINED_SCHEMA).close()  # a footer, no row group
    write_json(layout.metadata_path("train"), {"total_rows": 0})
    assert pq.ParquetFile(layout.shard_path("train", 0)).num_row_groups == 0
    with pytest.raises(DataError, match=rf"{layout.split_dir('train')}: the 1 shard file\(s\) hold no rows"):
        read_all(tmp_path)
    with pytest.raises(DataError, match=r"0 rows in 0 row group\(s\) cannot give each of 2 ranks a row"):
        plan_rank((), 5, 0, 2)


def test_a_split_without_metadata_is_refused_as_incomplete(copy):
    layout = DatasetLayout(copy)
    layout.metadata_path("train").unlink()  # what a killed prepare or synth leaves: renamed shards, no metadata
    shards = len(layout.shards("train"))
    with pytest.raises(DataError, match=rf"{layout.split_dir('train')}: metadata.json is missing but {shards} shard file\(s\) hold \d+ rows"):
        read_all(copy)


def test_metadata_row_count_disagreeing_with_the_footers_is_refused(copy):
    layout = DatasetLayout(copy)
    meta = layout.read_metadata("train")
    footers = sum(pq.ParquetFile(p).metadata.num_rows for p in layout.shards("train"))
    assert meta["total_rows"] == footers
    layout.metadata_path("train").write_text(json.dumps(meta | {"total_rows": footers + 3}))
    with pytest.raises(DataError, match=(
        rf"{layout.metadata_path('train')}: total_rows is {footers + 3} but the {len(layout.shards('train'))} "
        rf"shard footers in {layout.split_dir('train')} hold {footers} rows"
    )):
        read_all(copy)


def test_null_ids_inside_sequences_read_as_0_like_prepare_writes_them(copy, handmade):
    """A null behaviour ID is 'missing' (0) and a null list an empty sequence, in the fast and the reference decode."""
    rows = [dict(r) for r in handmade[1]]
    long = [i for i, r in enumerate(rows[:40]) if len(r[schema.HIST_ITEMS]) >= 3]  # shard 0 holds rows 0..39
    rows[long[0]][schema.HIST_ITEMS] = [None, *rows[long[0]][schema.HIST_ITEMS][1:]]
    rows[long[1]][schema.HIST_CATES] = [*rows[long[1]][schema.HIST_CATES][:-1], None]
    rows[long[2]][schema.HIST_ITEMS] = rows[long[2]][schema.HIST_CATES] = None
    path = rewrite_shard(copy, lambda t: pa.Table.from_pylist(rows[: t.num_rows], schema=schema.JOINED_SCHEMA))
    assert pq.read_table(path).column(schema.HIST_ITEMS).combine_chunks().flatten().null_count == 1
    as_prepared = [
        r | {c: [0 if x is None else x for x in r[c] or []] for c in (schema.HIST_ITEMS, schema.HIST_CATES)} for r in rows
    ]
    got, want = flatten(read_all(copy)), expected_rows(copy, as_prepared, "p90")
    for key, expected in want.items():
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
    table = pq.ParquetFile(path).read_row_group(0)
    maps = FeatureMaps.load(DatasetLayout(copy), "p90")
    fast, slow = decode_rows(table, maps, L, "x"), decode_reference(table, maps, L)
    np.testing.assert_array_equal(fast.items[fast.sequence_of_row], slow.items[slow.sequence_of_row])
    np.testing.assert_array_equal(fast.cates[fast.sequence_of_row], slow.cates[slow.sequence_of_row])


def test_unsorted_feature_map_is_refused(copy):
    path = DatasetLayout(copy).map_path(schema.CATE_MAP)
    keys = np.load(path)
    keys[[2, 3]] = keys[[3, 2]]
    save_npy(path, keys)
    with pytest.raises(DataError, match=rf"{path}: feature map is not sorted strictly increasing: keys\[2\]"):
        read_all(copy)


def test_unsorted_duplicated_scl_keys_are_repaired_or_refused(copy, handmade, caplog):
    layout = DatasetLayout(copy)
    keys, values = np.load(layout.scl_keys_path), np.load(layout.scl_values_path)
    order = np.random.default_rng(0).permutation(len(keys))
    bad_keys = np.concatenate([keys[order], keys[:1]])  # shuffled, and the first key again
    bad_values = np.concatenate([values[order], np.full((1, schema.SCL_DIM), 99, np.int8)])
    save_npy(layout.scl_keys_path, bad_keys)
    save_npy(layout.scl_values_path, bad_values)
    with caplog.at_level(logging.WARNING):
        maps = FeatureMaps.load(layout, "p90")
    assert "not sorted, unique and non-zero" in caplog.text and "1 duplicated key(s)" in caplog.text
    rows = maps.scl.remap(keys)  # every key finds its own vector; the duplicate's first occurrence wins
    np.testing.assert_array_equal(bad_values[rows - 1], values)
    with pytest.raises(DataError, match="SCL keys are not sorted, unique and non-zero.*refused because strict"):
        read_all(copy, strict=True)


def test_scl_key_0_is_dropped_so_missing_items_read_the_zero_row(copy, caplog):
    """0 means 'missing': a vector keyed 0 must not reach a missing target or behaviour."""
    layout = DatasetLayout(copy)
    before = flatten(read_all(copy))
    keys, values = np.load(layout.scl_keys_path), np.load(layout.scl_values_path)
    save_npy(layout.scl_keys_path, np.concatenate([[0], keys]))  # still sorted: only the 0 is wrong
    save_npy(layout.scl_values_path, np.concatenate([np.full((1, schema.SCL_DIM), 99, np.int8), values]))
    with caplog.at_level(logging.WARNING):
        after = flatten(read_all(copy))
    assert "1 key(s) 0" in caplog.text and "keys 0 are dropped" in caplog.text
    for key in SCL_FEATURES:  # every vector row moved down by the one in front; the zero row stays 0
        np.testing.assert_array_equal(after[key], np.where(before[key] > 0, before[key] + 1, 0), err_msg=key)
    assert (before[schema.SCL_LONG] == 0).any()
    with pytest.raises(DataError, match=r"0 duplicated key\(s\), 1 key\(s\) 0\); refused because strict"):
        read_all(copy, strict=True)


def test_read_ahead_yields_the_in_process_batches_in_order(tmp_path):
    """`data.read_ahead`: a thread of this process reads the batches, the same ones, in the same order."""
    uneven_dataset(tmp_path)
    plain = list(make_dataloader(ShardDataset(config(tmp_path, batch_size=7), "train"), num_workers=0))
    loader = make_dataloader(ShardDataset(config(tmp_path, batch_size=7, read_ahead=2), "train"), num_workers=0)
    assert isinstance(loader, ReadAhead)
    ahead = list(loader)
    assert len(ahead) == len(plain) > 2
    for a, b in zip(ahead, plain):
        assert a.batch_size == b.batch_size
        for key, values in flatten([a], real_only=False).items():
            np.testing.assert_array_equal(values, flatten([b], real_only=False)[key], err_msg=key)


def test_read_ahead_raises_the_readers_error_after_the_batches_before_it_and_stops_when_left():
    class Failing:
        def __iter__(self):
            yield from (1, 2)
            raise DataError("row group 3: corrupt")

    seen = []
    with pytest.raises(DataError, match="row group 3: corrupt"):
        for item in ReadAhead(Failing(), depth=1):
            seen.append(item)
    assert seen == [1, 2]
    threads = threading.active_count()
    endless = iter(ReadAhead(itertools.count(), depth=2))
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # leaving the loop early: the reading thread ends
    assert threading.active_count() == threads
