"""`muse-rec download`: fetch the files of TAOBAO-MM that a run needs from the Hugging Face hub.

The dataset repo (about 139 GB) holds the layout of `layout.DatasetLayout`. `select_files` picks,
from the repo's file list, only what one vocabulary and the chosen splits need; `download` fetches
them with `huggingface_hub.snapshot_download`, which is resumable (files land under `.incomplete`
names and are renamed when complete; a re-run skips complete files). Without network it fails in
seconds with what to do instead, rather than after the hub client's half minute of retries; a full
disk or a `--dest` it may not write to is named as such, not taken for being offline.

`dest` is download's own output (`atomic.claim_output_dir`): a re-run resumes or extends an earlier
download there (also one of a muse_rec version before output markers: the hub client's
HUB_CLIENT_DIR is there), but a directory holding train/, test/, feature_map/ or raw/ that download
did not write (a synthetic or prepared set, or a copy) is refused unless `force`, which deletes those
entries before fetching so that none of their files can pass for the hub's.
"""
from __future__ import annotations

import contextlib
import fnmatch
import importlib
import json
import logging
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from muse_rec.data import schema
from muse_rec.data.atomic import MARKER, claim_output_dir, file_system_error, mark_output, write_json
from muse_rec.data.checks import open_parquet
from muse_rec.data.layout import ENTRIES, SPLITS, DatasetLayout
from muse_rec.errors import DataError

log = logging.getLogger(__name__)

COMMAND = "download"  # the name in output markers
REPO_ID = "TaoBao-MM/Taobao-MM"
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 10.0
HUB_METADATA = "metadata.hub.json"
"""Where the hub's metadata.json of a split is kept when only some of its shards were fetched."""
HUB_CLIENT_DIR = ".cache/huggingface"
"""What the hub client keeps in a directory it downloads into: its mark on a download of an earlier
muse_rec version (before output markers), which is resumed as download's own."""
PARTIAL_KEY = "partial_copy"
"""Key of a metadata.json that `write_partial_metadata` wrote (the hub's has no such key)."""

_REPO_LAYOUT = DatasetLayout("")  # paths relative to the repo root, as the hub lists them


def select_files(
    repo_files: list[str],
    vocab: str = "p90",
    splits: tuple[str, ...] = SPLITS,
    max_shards: int | None = None,
    raw: bool = False,
) -> list[str]:
    """The repo paths one run needs: feature maps of `vocab`, the SCL table, the splits' shards.

    Pure over the repo listing, so the choice is testable without network. The first
    `max_shards` shards of each split (in name order) are taken when given; raw/ only if `raw`.
    No splits select no split files: a user who only prepares or inspects wants the maps (and raw).
    """
    check_selection(vocab, splits, max_shards)
    listed = set(repo_files)
    needed = [_repo_path(_REPO_LAYOUT.map_path(field, vocab)) for field in schema.FEATURE_MAPS]
    needed += [_repo_path(_REPO_LAYOUT.scl_keys_path), _repo_path(_REPO_LAYOUT.scl_values_path)]
    needed += [_repo_path(_REPO_LAYOUT.metadata_path(split)) for split in splits]
    missing = [path for path in needed if path not in listed]
    if missing:
        raise DataError(f"dataset repo listing lacks {len(missing)} needed file(s): {', '.join(missing)}")
    selected = list(needed)
    for split in splits:
        selected += listed_shards(repo_files, split)[:max_shards]
    if raw:
        raw_files = sorted(path for path in listed if path.startswith(f"{_repo_path(_REPO_LAYOUT.raw_dir)}/"))
        if not raw_files:
            raise DataError(f"dataset repo listing has no files under {_repo_path(_REPO_LAYOUT.raw_dir)}/ (raw tables asked for)")
        selected += raw_files
    return sorted(selected)


def check_selection(vocab: str, splits: tuple[str, ...], max_shards: int | None) -> None:
    """Refuse a selection no listing can satisfy, before the hub is contacted."""
    if vocab not in schema.VOCABS:
        raise DataError(f"unknown vocabulary {vocab!r}: expected one of {', '.join(schema.VOCABS)}")
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise DataError(f"unknown split(s) {unknown}: expected any of {', '.join(SPLITS)} (or none, for the maps only)")
    if max_shards is not None and max_shards < 1:
        raise DataError(f"max_shards must be at least 1, found {max_shards}")


def listed_shards(repo_files: list[str], split: str) -> list[str]:
    """The split's shard files in the repo listing, in name order; none is an error."""
    pattern = _repo_path(_REPO_LAYOUT.split_dir(split) / f"{split}-shard-*.parquet")
    shards = sorted(fnmatch.filter(repo_files, pattern))
    if not shards:
        raise DataError(f"dataset repo listing has no shard files of split {split!r} (expected {pattern})")
    return shards


def _repo_path(path: Path) -> str:
    return path.as_posix()


def hub_endpoint() -> str:
    """The hub to use, read at call time: huggingface_hub reads HF_ENDPOINT only when imported."""
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def download(
    dest: str | Path,
    vocab: str = "p90",
    splits: tuple[str, ...] = SPLITS,
    max_shards: int | None = None,
    raw: bool = False,
    repo_id: str = REPO_ID,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Fetch the selected files of `repo_id` into `dest`; returns a summary of what is there.

    When `max_shards` cut a split short, its metadata.json is rewritten to describe the shards
    actually fetched (the hub's is kept as metadata.hub.json), so `muse-rec verify` passes.
    `force` replaces a data set in `dest` that download did not write (the module doc).
    """
    from huggingface_hub import HfApi, snapshot_download

    check_selection(vocab, tuple(splits), max_shards)
    dest = Path(dest)
    endpoint = hub_endpoint()
    _check_reachable(endpoint, repo_id, dest)
    with _hub_errors(endpoint, repo_id, dest):
        repo_files = HfApi(endpoint=endpoint).list_repo_files(repo_id, repo_type="dataset")
        selected = select_files(repo_files, vocab, tuple(splits), max_shards, raw)
        params = {"repo_id": repo_id, "endpoint": endpoint, "vocab": vocab, "splits": list(splits), "max_shards": max_shards, "raw": raw}
        if not (dest / MARKER).exists() and (dest / HUB_CLIENT_DIR).is_dir():  # fetched before output markers: resumed
            mark_output(dest, COMMAND, params)
        for name in claim_output_dir(dest, COMMAND, params, ENTRIES, force, "choose another --dest"):
            path = dest / name  # of another's data set, replaced with --force
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        log.info("downloading %d file(s) of %s from %s into %s", len(selected), repo_id, endpoint, dest)
        with _hub_progress_bars(progress):
            snapshot_download(repo_id, repo_type="dataset", local_dir=dest, allow_patterns=selected, endpoint=endpoint)
        layout = DatasetLayout(dest)
        split_summaries = {}
        for split in splits:
            shards = listed_shards(repo_files, split)
            fetched = len(set(shards).intersection(selected))
            meta = write_partial_metadata(layout, split) if fetched < len(shards) else restore_hub_metadata(layout, split)
            on_disk = len(layout.shards(split))  # a partial copy may keep more shards from an earlier run
            split_summaries[split] = {"shards": on_disk, "rows": meta["total_rows"], "partial": PARTIAL_KEY in meta}
            log.info("%s: %d shard(s), %d rows in %s", split, on_disk, meta["total_rows"], layout.split_dir(split))
        mark_output(dest, COMMAND, params)
    log.info("feature maps (%s vocabulary) and SCL table in %s", vocab, layout.feature_map_dir)
    return {
        "dest": str(dest),
        "endpoint": endpoint,
        "repo_id": repo_id,
        "vocab": vocab,
        "files": len(selected),
        "splits": split_summaries,
        "raw": raw,
    }


def write_partial_metadata(layout: DatasetLayout, split: str) -> dict:
    """Describe the shards on disk in metadata.json, keeping the hub's as metadata.hub.json.

    Row counts come from the parquet footers. Idempotent: a metadata.json this function wrote
    (marked with PARTIAL_KEY) is never taken for the hub's.
    """
    meta_path = layout.metadata_path(split)
    hub_path = layout.split_dir(split) / HUB_METADATA
    if PARTIAL_KEY not in layout.read_metadata(split):
        os.replace(meta_path, hub_path)
    hub_meta = json.loads(hub_path.read_text()) if hub_path.exists() else {}
    shards = [{"file": path.name, "rows": open_parquet(path).metadata.num_rows} for path in layout.shards(split)]
    meta = {
        "total_rows": sum(shard["rows"] for shard in shards),
        "num_shards": len(shards),
        "shards": shards,
        PARTIAL_KEY: {
            "hub_metadata": HUB_METADATA,
            "hub_total_rows": hub_meta.get("total_rows"),
            "hub_num_shards": hub_meta.get("num_shards"),
        },
    }
    write_json(meta_path, meta)
    log.info("%s: partial copy, %d of the hub's shards; wrote %s (hub's kept as %s)",
             split, len(shards), meta_path, hub_path.name)
    return meta


def restore_hub_metadata(layout: DatasetLayout, split: str) -> dict:
    """A complete split uses the hub's metadata.json: undo what an earlier partial run rewrote.

    The hub client may have kept that rewrite as current (it trusts files modified within a
    second of its own write), so metadata.json is checked for PARTIAL_KEY, not assumed fresh.
    """
    hub_path = layout.split_dir(split) / HUB_METADATA
    if hub_path.exists():
        if PARTIAL_KEY in layout.read_metadata(split):
            os.replace(hub_path, layout.metadata_path(split))
        else:
            hub_path.unlink()
    return layout.read_metadata(split)


def _check_reachable(endpoint: str, repo_id: str, dest: Path) -> None:
    """One request with a short timeout: any HTTP answer means reachable; no answer means offline."""
    try:
        request = urllib.request.Request(f"{endpoint}/api/datasets/{repo_id}", method="HEAD")
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # the hub answered (even 401/404): the listing call will say what is wrong
    except ValueError as e:
        raise DataError(f"HF_ENDPOINT={endpoint!r} is not a usable URL ({e}); expected e.g. {DEFAULT_ENDPOINT}") from None
    except OSError as e:  # URLError, DNS failure, refused connection, timeout
        raise _offline_error(endpoint, repo_id, dest, getattr(e, "reason", e)) from None


def _offline_error(endpoint: str, repo_id: str, dest: Path, reason: object) -> DataError:
    return DataError(
        f"cannot reach the Hugging Face hub at {endpoint} ({reason}): this machine seems to be offline. "
        f"Either point HF_ENDPOINT to a reachable mirror of the hub (e.g. HF_ENDPOINT=https://hf-mirror.com), "
        f"or copy the files of the dataset repo {repo_id} by hand into {dest} (train/, test/, feature_map/; "
        f"check them with `muse-rec verify`). `muse-rec synth` writes a synthetic data set in the same layout "
        f"to work without the real one."
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the network going away raises: the standard library's errors, the hub client's "cannot
    reach the hub", and the transport errors of whichever HTTP client the installed huggingface_hub
    uses (requests' are OSErrors, httpx's are not). Any other OSError is the local side's."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror, socket.herror, urllib.error.URLError]
    errors.append(LocalEntryNotFoundError)
    for module, name in (("requests", "RequestException"), ("httpx", "TransportError"), ("httpx2", "TransportError")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str, dest: Path) -> Iterator[None]:
    """Turn failures into DataErrors: an HTTP error answer, the network going away, or the local
    side (a full disk, no permission to write `dest`), each named as such."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as e:
        raise DataError(f"{endpoint}: request for dataset repo {repo_id} failed: {e}") from None
    except _network_errors() as e:
        raise _offline_error(endpoint, repo_id, dest, e) from None
    except OSError as e:
        elsewhere = "choose another --dest (a re-run into the same --dest resumes: the files already fetched are kept)"
        raise file_system_error(e, dest, elsewhere) from None


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Switch the hub's own tqdm bars on or off for one call, restoring the previous setting."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()
