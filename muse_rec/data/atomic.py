"""Writing that never loses data: files written then renamed, output directories a command may
claim, and a finished data set swapped into place safely against a crash at any point.

Files. A file is written under a temporary name (`partial_name`) and renamed when complete, so an
interrupted command never leaves a half file that looks complete.

Output directories. A writing command (synth, prepare, download) leaves a marker, MARKER, in its
output directory: the command, the muse_rec version and the run's parameters. It replaces only
what it wrote itself: `claim_output_dir` refuses, before anything is deleted, a directory that holds
any entry the command would replace (train/, test/, feature_map/, raw/) when the marker names
another command or is missing (a data set downloaded or copied by hand, or written by a muse_rec
version before the marker). Other files do not count; an empty or missing directory is claimed;
`force` claims any.

Swapping a data set in (`staged_swap`). A command that rebuilds a data set writes it into a staging
directory inside the output, `.{command}.partial/`, and when it is complete swaps its entries in:
1. commit: the journal SWAP_JOURNAL (staging and aside names, the entries replaced, those the new
   set has) is written atomically. A failure before it leaves the old set untouched; the next start
   discards the staging (an unfinished run's). After it, the new set is never thrown away.
2. each old entry is renamed into `.{command}.old/`, in the order given (the splits first: a
   directory without both splits' metadata.json is incomplete to every reader);
3. each new entry is renamed in from the staging, in reverse order (the splits last);
4. the journal is deleted, then the old copies and the staging directory.
`recover_swap`, run whenever a command starts a swap in the directory, redoes steps 2-4 from the
journal: an entry already moved in is recognised (gone from the staging), so it finishes a swap
stopped anywhere. The directory thus holds the complete old or the complete new set, but between
steps 2 and 3 neither (readers see a split missing) until a re-run finishes the swap. Renames
within one file system copy nothing; a re-run needs disk room for both sets until the swap.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from muse_rec import __version__
from muse_rec.errors import DataError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
MARKER = ".muse_rec-output.json"
"""The output marker: which muse-rec command wrote the data set in its directory."""
SWAP_JOURNAL = ".muse_rec-swap.json"
"""Present while a committed swap is unfinished (module doc)."""

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def partial_name(path: Path) -> Path:
    """The temporary name `path` is written under; readers ignore such files."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def npy_memmap_writer(path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[np.ndarray]:
    """A writable memory-mapped `.npy` for arrays larger than RAM, renamed into place on success."""
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array


def file_system_error(error: OSError, path: Path, elsewhere: str) -> DataError:
    """A user's message for `error`, met writing under `path`: the file, what went wrong, what to do."""
    where = error.filename or path
    if error.errno in _NO_SPACE:
        return DataError(f"cannot write {where}: no space left on its file system ({error.strerror}). Free space there, or {elsewhere}.")
    if error.errno in _NO_PERMISSION:
        return DataError(f"cannot write {where}: {error.strerror}. Make {path} writable for this user, or {elsewhere}.")
    return DataError(f"{where}: {error}")


# -- output directories ----------------------------------------------------------------------------
def _listing(names: Sequence[str]) -> str:
    return ", ".join(f"{name}/" for name in names)


def _owner(root: Path) -> str | None:
    """The command the marker of `root` names: None without a marker, "" for an unreadable one."""
    try:
        return str(json.loads((root / MARKER).read_text())["command"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        return ""


def _held(owner: str | None, command: str, present: list[str]) -> str:
    """What a directory holds that `command` did not write, in words."""
    if owner is None:
        return (
            f"holds {_listing(present)} not written by `muse-rec {command}` (there is no {MARKER}: data sets "
            f"copied by hand, fetched by the hub client, or written by muse_rec before such markers have none)"
        )
    if not owner:
        return f"holds {_listing(present)} and an unreadable {MARKER}"
    return f"holds a data set written by `muse-rec {owner}`"


def claim_output_dir(
    root: str | Path, command: str, params: dict, entries: Sequence[str], force: bool = False, elsewhere: str = "choose another --out"
) -> list[str]:
    """Make `root` the output of `command` before anything in it is deleted (module doc).

    Refuses, unless `force`, a directory with any of `entries` that `command` did not write; the
    message says what is there and how to proceed (`--force`, or `elsewhere`). Marks a directory
    that is not yet the command's (the run's `mark_output` on success records its parameters).
    Returns the entries of another's data set that `force` let through (none when free or ours).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: expected a directory for the output of `muse-rec {command}`, found a file")
    present = [name for name in entries if os.path.lexists(root / name)]
    owner = _owner(root)
    taken = present if owner != command else []
    if taken and not force:
        raise DataError(
            f"{root} {_held(owner, command, taken)}: `muse-rec {command}` would replace {_listing(taken)}. "
            f"Rerun with --force to replace them, or {elsewhere}."
        )
    if taken:
        log.warning("%s %s: replacing %s (--force)", root, _held(owner, command, taken), _listing(taken))
    if owner != command:
        try:
            mark_output(root, command, params)
        except OSError as e:
            raise file_system_error(e, root, elsewhere) from None
    return taken


def mark_output(root: str | Path, command: str, params: dict) -> None:
    """Record in `root` that `command` (this muse_rec version, these parameters) wrote its data set;
    writes nothing when the marker already says so."""
    marker = json.loads(json.dumps({"command": command, "version": __version__, "params": params}))
    path = Path(root) / MARKER
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()) == marker:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, marker)


# -- the crash-safe swap ---------------------------------------------------------------------------
def _staging_names(command: str) -> tuple[str, str]:
    return f".{command}{PARTIAL_SUFFIX}", f".{command}.old"


@contextlib.contextmanager
def staged_swap(root: str | Path, command: str, entries: Sequence[str]) -> Iterator[Path]:
    """Yield an empty staging directory inside `root`; when the block succeeds, swap its `entries`
    in for the old ones (module doc); when it fails, delete it and leave `root` as it was.

    Call it after `claim_output_dir`: a swap another run committed here is finished first, and an
    unfinished run's staging and old copies are deleted.
    """
    root = Path(root)
    recover_swap(root)
    staging, aside = (root / name for name in _staging_names(command))
    for leftover in (staging, aside):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(root, command, entries)


def swap_in(root: Path, command: str, entries: Sequence[str]) -> None:
    """Commit the staging of `command` (its journal) and swap its entries in."""
    staging_name, aside_name = _staging_names(command)
    staging = root / staging_name
    journal = {
        "command": command,
        "staging": staging_name,
        "aside": aside_name,
        "entries": list(entries),
        "new": [name for name in entries if os.path.lexists(staging / name)],
    }
    try:
        write_json(root / SWAP_JOURNAL, journal)
    except OSError as e:
        if (root / SWAP_JOURNAL).exists():  # committed: only the cleanup of its temporary file failed
            log.warning("%s: %s", root, e)
        else:
            raise DataError(
                f"{root}: could not commit the new data set ({e}); the earlier one is untouched, the new one in {staging} is "
                f"discarded by the next run"
            ) from e
    _finish_swap(root, journal)


def recover_swap(root: str | Path) -> bool:
    """Finish a swap a run committed in `root` but did not finish; True if there was one."""
    root = Path(root)
    path = root / SWAP_JOURNAL
    try:
        journal = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable swap journal ({e}); it records an unfinished swap of {root}") from None
    log.warning("%s: finishing the swap of a new data set that an earlier `muse-rec %s` run committed", root, journal["command"])
    _finish_swap(root, journal)
    return True


def _finish_swap(root: Path, journal: dict) -> None:
    """Steps 2-4 of the module doc, from wherever an earlier attempt stopped."""
    staging, aside = root / journal["staging"], root / journal["aside"]
    try:
        aside.mkdir(exist_ok=True)
        for name in journal["entries"]:
            moved_in = name in journal["new"] and not os.path.lexists(staging / name)
            if os.path.lexists(root / name) and not moved_in:
                os.replace(root / name, aside / name)
        for name in reversed(journal["entries"]):
            if os.path.lexists(staging / name):
                os.replace(staging / name, root / name)
        (root / SWAP_JOURNAL).unlink()
    except OSError as e:
        raise DataError(
            f"{root}: swapping in the new data set stopped ({e}); {SWAP_JOURNAL} there records it, and the next "
            f"`muse-rec {journal['command']}` run over {root} finishes it"
        ) from e
    for leftover in (aside, staging):
        try:
            if leftover.exists():
                shutil.rmtree(leftover)
        except OSError as e:
            log.warning("%s: the new data set is in place, but %s could not be deleted (%s): the next run deletes it", root, leftover, e)
