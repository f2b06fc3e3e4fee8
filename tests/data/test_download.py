"""File selection over a realistic hub listing, partial-copy metadata, and failing fast offline."""
from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import requests
from huggingface_hub.errors import LocalEntryNotFoundError

from muse_rec.cli import main
from muse_rec.data import atomic, schema
from muse_rec.data import download as download_module
from muse_rec.data.atomic import MARKER
from muse_rec.data.download import HUB_CLIENT_DIR, HUB_METADATA, PARTIAL_KEY, download, restore_hub_metadata, select_files, write_partial_metadata
from muse_rec.data.layout import RAW_TABLES, DatasetLayout
from muse_rec.data.verify import verify
from muse_rec.errors import DataError

TRAIN_SHARDS, TEST_SHARDS = 161, 49
FULL_ITEM_MAP = "feature_map/150_2_180_sorted_map.npy"
P90_ITEM_MAP = "feature_map/150_2_180_sorted_map_p90.npy"
SCL = ["feature_map/scl_emb_int8_p90_keys.npy", "feature_map/scl_emb_int8_p90_values.npy"]
OTHER_MAPS = [f"feature_map/{field}_sorted_map.npy" for field in schema.FEATURE_MAPS if field != schema.ITEM_MAP]
RAW = [f"raw/{name}.parquet" for name in RAW_TABLES]


def _shards(split: str, count: int) -> list[str]:
    return [f"{split}/{split}-shard-{i:06d}.parquet" for i in range(count)]


def hub_listing() -> list[str]:
    """The released repo's file list, as `list_repo_files` returns it (order not guaranteed)."""
    files = [".gitattributes", "README.md", *RAW, *OTHER_MAPS, FULL_ITEM_MAP, P90_ITEM_MAP, *SCL]
    files += ["train/metadata.json", *_shards("train", TRAIN_SHARDS), "test/metadata.json", *_shards("test", TEST_SHARDS)]
    random.Random(0).shuffle(files)
    return files


def test_default_selection_is_p90_maps_scl_and_both_splits() -> None:
    selected = select_files(hub_listing())
    expected = [*OTHER_MAPS, P90_ITEM_MAP, *SCL, "train/metadata.json", "test/metadata.json"]
    expected += _shards("train", TRAIN_SHARDS) + _shards("test", TEST_SHARDS)
    assert selected == sorted(expected)
    assert FULL_ITEM_MAP not in selected and not any(path.startswith("raw/") for path in selected)


def test_full_vocab_takes_the_full_item_map_instead_of_p90() -> None:
    selected = select_files(hub_listing(), vocab="full")
    assert FULL_ITEM_MAP in selected and P90_ITEM_MAP not in selected
    assert set(OTHER_MAPS + SCL) <= set(selected)


def test_one_split_with_max_shards_takes_its_first_shards_in_name_order() -> None:
    selected = select_files(hub_listing(), splits=("test",), max_shards=3)
    assert [path for path in selected if path.startswith("test/")] == ["test/metadata.json", *_shards("test", 3)]
    assert not any(path.startswith("train/") for path in selected)


def test_max_shards_beyond_the_split_takes_all_of_it() -> None:
    selected = select_files(hub_listing(), vocab="full", splits=("train", "test"), max_shards=100, raw=True)
    assert len([p for p in selected if p.startswith("train/train-shard-")]) == 100
    assert len([p for p in selected if p.startswith("test/test-shard-")]) == TEST_SHARDS


def test_raw_adds_every_raw_table() -> None:
    selected = select_files(hub_listing(), splits=("train",), raw=True)
    assert set(RAW) <= set(selected)
    assert set(select_files(hub_listing(), splits=("train",))) == set(selected) - set(RAW)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"vocab": "p80"}, "unknown vocabulary 'p80'"),
        ({"splits": ("train", "valid")}, "unknown split(s) ['valid']"),
        ({"max_shards": 0}, "max_shards must be at least 1"),
    ],
)
def test_bad_options_are_data_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(DataError) as error:
        select_files(hub_listing(), **kwargs)
    assert words in str(error.value)


def test_no_splits_select_the_maps_only_and_raw_if_asked() -> None:
    maps = sorted([*OTHER_MAPS, P90_ITEM_MAP, *SCL])
    assert select_files(hub_listing(), splits=()) == maps
    assert select_files(hub_listing(), splits=(), raw=True) == sorted(maps + RAW)


def test_cli_empty_splits_reach_download_as_no_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("muse_rec.data.download.download", lambda dest, **kwargs: calls.append(kwargs) or {})
    assert main(["download", "--quiet", "--dest", str(tmp_path), "--splits", "", "--raw"]) == 0
    assert calls[0]["splits"] == () and calls[0]["raw"] is True


@pytest.mark.parametrize("lacking", ["feature_map/213_sorted_map.npy", P90_ITEM_MAP, SCL[1], "test/metadata.json"])
def test_a_needed_file_missing_from_the_listing_is_named(lacking: str) -> None:
    with pytest.raises(DataError, match="lacks 1 needed file") as error:
        select_files([path for path in hub_listing() if path != lacking])
    assert lacking in str(error.value)


def test_missing_full_item_map_only_matters_for_vocab_full() -> None:
    listing = [path for path in hub_listing() if path != FULL_ITEM_MAP]
    assert P90_ITEM_MAP in select_files(listing)
    with pytest.raises(DataError, match=FULL_ITEM_MAP):
        select_files(listing, vocab="full")


def test_a_split_without_shards_and_raw_without_tables_are_errors() -> None:
    with pytest.raises(DataError, match=r"no shard files of split 'test' \(expected test/test-shard-\*\.parquet\)"):
        select_files([path for path in hub_listing() if not path.startswith("test/test-shard-")])
    with pytest.raises(DataError, match="no files under raw/"):
        select_files([path for path in hub_listing() if not path.startswith("raw/")], raw=True)


def test_download_fails_fast_with_advice_when_the_hub_is_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens, refused at once
    dest = tmp_path / "taobao-mm"
    with pytest.raises(DataError) as error:
        download(dest, progress=False)
    message = str(error.value)
    for words in ("http://127.0.0.1:9", "seems to be offline", "HF_ENDPOINT", "by hand", "muse-rec synth", str(dest)):
        assert words in message
    assert not dest.exists()  # nothing was started


def test_download_rejects_an_endpoint_that_is_not_a_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.com")
    with pytest.raises(DataError, match="HF_ENDPOINT='hf-mirror.com' is not a usable URL"):
        download(tmp_path, progress=False)


@pytest.fixture
def partial_copy(synthetic_root: Path, tmp_path: Path) -> DatasetLayout:
    """A copy of the synthetic set as `max_shards` leaves it: the hub's metadata.json, fewer shards."""
    root = tmp_path / "partial"
    shutil.copytree(synthetic_root, root)
    layout = DatasetLayout(root)
    layout.shards("train")[-1].unlink()
    return layout


def test_partial_metadata_describes_the_shards_on_disk_and_keeps_the_hubs(partial_copy: DatasetLayout) -> None:
    hub_meta = partial_copy.read_metadata("train")
    meta = write_partial_metadata(partial_copy, "train")
    shards = partial_copy.shards("train")
    assert meta == partial_copy.read_metadata("train")
    assert meta["num_shards"] == len(shards) == hub_meta["num_shards"] - 1
    assert [s["file"] for s in meta["shards"]] == [p.name for p in shards]
    assert meta["total_rows"] == sum(s["rows"] for s in hub_meta["shards"][:-1])
    assert meta[PARTIAL_KEY]["hub_total_rows"] == hub_meta["total_rows"]
    assert json.loads((partial_copy.split_dir("train") / HUB_METADATA).read_text()) == hub_meta
    assert [f for f in verify(partial_copy.root, progress=False) if f.path.startswith(str(partial_copy.split_dir("train")))] == []


def test_partial_metadata_is_idempotent_and_undone_for_a_complete_split(partial_copy: DatasetLayout) -> None:
    hub_meta = partial_copy.read_metadata("train")
    first = write_partial_metadata(partial_copy, "train")
    assert write_partial_metadata(partial_copy, "train") == first  # ours is never taken for the hub's
    assert json.loads((partial_copy.split_dir("train") / HUB_METADATA).read_text()) == hub_meta
    assert restore_hub_metadata(partial_copy, "train") == hub_meta
    assert not (partial_copy.split_dir("train") / HUB_METADATA).exists()


# -- what goes wrong on the local side, and what download may replace ------------------------------
@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The hub as far as `download` sees it, without network: reachable, the released listing, and a
    `snapshot_download` that records its calls (a test makes it fail as it needs)."""
    calls: list[dict] = []
    monkeypatch.setattr(download_module, "_check_reachable", lambda *args: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *args, **kwargs: hub_listing())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: calls.append(kwargs))
    return calls


def failing(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize(
    "error, words",
    [
        (OSError(errno.ENOSPC, "No space left on device", "{dest}/train/train-shard-000007.parquet.incomplete"),
         ["cannot write {dest}/train/train-shard-000007.parquet.incomplete: no space left on its file system", "Free space there"]),
        (PermissionError(errno.EACCES, "Permission denied", "{dest}/.cache/huggingface"),
         ["cannot write {dest}/.cache/huggingface: Permission denied. Make {dest} writable for this user"]),
        (PermissionError(errno.EPERM, "Operation not permitted", "{dest}/feature_map"), ["cannot write {dest}/feature_map: Operation not permitted"]),
        (OSError(errno.EROFS, "Read-only file system", "{dest}/test"), ["cannot write {dest}/test: Read-only file system"]),
    ],
    ids=["ENOSPC", "EACCES", "EPERM", "EROFS"],
)
def test_a_full_disk_or_no_permission_is_named_not_taken_for_offline(
    hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, words: list[str]
) -> None:
    dest = tmp_path / "taobao-mm"
    error.filename = error.filename.format(dest=dest)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing(error))
    with pytest.raises(DataError) as raised:
        download(dest, splits=(), progress=False)
    message = str(raised.value)
    for phrase in [*words, "or choose another --dest (a re-run into the same --dest resumes"]:
        assert phrase.format(dest=dest) in message
    assert "offline" not in message


def test_no_permission_to_create_dest_is_named(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "taobao-mm"
    monkeypatch.setattr(atomic, "write_json", failing(PermissionError(errno.EACCES, "Permission denied", str(dest))))
    with pytest.raises(DataError, match=f"cannot write {dest}: Permission denied. Make {dest} writable for this user, or choose another --dest"):
        download(dest, splits=(), progress=False)
    assert hub == []


@pytest.mark.parametrize(
    "error",
    [
        httpx2.ConnectError("[Errno 101] Network is unreachable"),
        requests.ConnectionError("Max retries exceeded"),
        LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    ],
    ids=["httpx", "requests", "hub-client", "reset"],
)
def test_network_errors_midway_still_say_offline(hub: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing(error))
    with pytest.raises(DataError, match="seems to be offline"):
        download(tmp_path / "taobao-mm", splits=(), progress=False)


def test_another_data_set_in_dest_is_refused_untouched_and_replaced_only_with_force(
    hub: list[dict], synthetic_root: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "taobao-mm"
    shutil.copytree(synthetic_root, dest)
    (dest / "notes.txt").write_text("the user's")
    before = sorted(p for p in dest.rglob("*"))
    with pytest.raises(DataError) as error:
        download(dest, splits=(), progress=False)
    assert str(error.value) == (
        f"{dest} holds a data set written by `muse-rec synth`: `muse-rec download` would replace train/, test/, "
        f"feature_map/, raw/. Rerun with --force to replace them, or choose another --dest."
    )
    assert hub == [] and sorted(p for p in dest.rglob("*")) == before

    download(dest, splits=(), progress=False, force=True)
    assert len(hub) == 1 and sorted(p.name for p in dest.iterdir()) == [MARKER, "notes.txt"]  # none of synth's files can pass for the hub's
    assert json.loads((dest / MARKER).read_text())["command"] == "download"


def test_an_earlier_download_is_resumed_without_force(hub: list[dict], tmp_path: Path) -> None:
    dest = tmp_path / "taobao-mm"
    download(dest, splits=(), progress=False)
    (dest / "feature_map").mkdir()
    (dest / "feature_map" / "213_sorted_map.npy").write_bytes(b"fetched before")  # what the first run fetched
    download(dest, splits=(), vocab="full", progress=False)
    assert len(hub) == 2 and hub[1]["local_dir"] == dest and (dest / "feature_map" / "213_sorted_map.npy").read_bytes() == b"fetched before"
    assert json.loads((dest / MARKER).read_text())["params"]["vocab"] == "full"


def test_a_download_of_an_earlier_version_without_marker_is_resumed_without_force(hub: list[dict], tmp_path: Path) -> None:
    dest = tmp_path / "taobao-mm"
    (dest / HUB_CLIENT_DIR / "download").mkdir(parents=True)  # the hub client's bookkeeping of its downloads
    (dest / "feature_map").mkdir()
    (dest / "feature_map" / "213_sorted_map.npy").write_bytes(b"fetched before")
    download(dest, splits=(), progress=False)
    assert len(hub) == 1 and (dest / "feature_map" / "213_sorted_map.npy").read_bytes() == b"fetched before"
    assert json.loads((dest / MARKER).read_text())["command"] == "download"
