"""Output directories a command may claim, and the crash-safe swap of a finished data set into place.

The swap is checked by making each of its file-system steps fail in turn (`failing_swap`), as a
crash there would stop it, then starting again: the directory must then hold the complete old set
or, once the swap was committed, the complete new one (the finished files are never thrown away).
The helpers here are used by the command-level tests of synth and prepare too.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from muse_rec.data import atomic
from muse_rec.data.atomic import MARKER, SWAP_JOURNAL, claim_output_dir, recover_swap, staged_swap
from muse_rec.data.layout import ENTRIES
from muse_rec.errors import DataError


class Steps:
    """Counts file-system steps (a rename, a directory made or removed, a file unlinked, a whole tree
    deleted) while armed, and makes step `fail_at` raise instead of running."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.count, self.fired = fail_at, 0, False
        self._inside = False

    def _wrap(self, original: Callable) -> Callable:
        def step(*args, **kwargs):
            if self._inside:  # a call made by a step (rmtree's unlinks): part of that step
                return original(*args, **kwargs)
            self.count += 1
            if self.count == self.fail_at:
                self.fired = True
                raise OSError(errno.EIO, f"injected failure at file-system step {self.count}", str(args[0]))
            self._inside = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside = False

        return step

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        with pytest.MonkeyPatch.context() as patch:
            for name in ("replace", "rename", "mkdir", "rmdir", "unlink"):
                patch.setattr(os, name, self._wrap(getattr(os, name)))
            patch.setattr(shutil, "rmtree", self._wrap(shutil.rmtree))
            yield


@contextlib.contextmanager
def failing_swap(fail_at: int) -> Iterator[Steps]:
    """While open, file-system step `fail_at` of a swap (`atomic.swap_in`) fails."""
    steps = Steps(fail_at)
    original = atomic.swap_in

    def swap_in(*args, **kwargs):
        with steps.armed():
            return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic, "swap_in", swap_in)
        yield steps


def visible(root: Path) -> dict[str, bytes]:
    """What a reader sees: every file but the hidden bookkeeping at the top (marker, journal, staging)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.relative_to(root).parts[0].startswith(".")
    }


def looks_complete(root: Path) -> bool:
    return all((root / split / "metadata.json").exists() for split in ("train", "test"))


def sweep_swap_failures(root: Path, old: dict[str, bytes], run: Callable[[], None]) -> dict[str, bytes]:
    """Run `run` (which swaps a new set into `root`, holding `old`) with each swap step failing in
    turn, restoring `old` before each try. After each failure: whatever a reader sees that looks
    complete is the old or the new set, and until the new set is in place every old file is still
    on disk (in place or moved aside: nothing is deleted before); the restart (`recover_swap`, which the next run starts with)
    leaves the old set if the swap was not committed, else the new one. Returns the new set, from
    the last try, which fails at no step."""
    seen, recovered = [], []
    for fail_at in itertools.count(1):
        with failing_swap(fail_at) as steps:
            try:
                run()
            except (OSError, DataError):
                assert steps.fired, "the run failed by itself"
        if not steps.fired:  # every step ran: the swap is done
            new = visible(root)
            assert not [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != MARKER]
            break
        committed = (root / SWAP_JOURNAL).exists() or visible(root) != old
        seen.append((fail_at, visible(root), looks_complete(root), kept(root, old)))
        recover_swap(root)
        assert looks_complete(root) and not (root / SWAP_JOURNAL).exists()
        recovered.append((fail_at, visible(root), committed))
        restore(root, old)
    assert new != old and fail_at > 5
    for fail_at, files, complete, old_kept in seen:
        assert not complete or files in (old, new), f"step {fail_at}: mixed files look complete"
        assert old_kept or files == new, f"step {fail_at}: old files deleted before the new set was in place"
    for fail_at, files, committed in recovered:
        assert files == (new if committed else old), f"step {fail_at}: committed {committed}, not restored to {'new' if committed else 'old'}"
    assert {committed for _, _, committed in recovered} == {False, True}  # failures on both sides of the commit
    return new


def kept(root: Path, files: dict[str, bytes]) -> bool:
    """Whether every one of `files` is still under `root`, in place or in a hidden directory there."""
    places = [root, *(p for p in root.iterdir() if p.is_dir() and p.name.startswith("."))]
    return all(any((place / name).is_file() and (place / name).read_bytes() == data for place in places) for name, data in files.items())


def restore(root: Path, files: dict[str, bytes]) -> None:
    """Put `files` back as the only visible content of `root` (hidden bookkeeping is kept)."""
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith("."):
            shutil.rmtree(entry)
        elif not entry.name.startswith("."):
            entry.unlink()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def write_set(root: Path, tag: str, entries=ENTRIES) -> dict[str, bytes]:
    """A stand-in data set: two files in each entry, metadata.json in the splits; returns them."""
    for entry in entries:
        for name in ("metadata.json" if entry in ("train", "test") else "a.npy", "part-0.parquet"):
            (root / entry).mkdir(parents=True, exist_ok=True)
            (root / entry / name).write_text(f"{tag} {entry}/{name}")
    return visible(root)


# -- the swap --------------------------------------------------------------------------------------
def test_a_swap_failing_at_any_step_leaves_the_old_or_the_new_set(tmp_path: Path) -> None:
    root = tmp_path / "data"
    old = write_set(root, "old")
    (root / "notes.txt").write_text("not a data set entry: never touched")
    old["notes.txt"] = (root / "notes.txt").read_bytes()

    def run() -> None:
        with staged_swap(root, "synth", ENTRIES) as staging:
            write_set(staging, "new", ENTRIES[:3])  # the new set has no raw/: the old one must go too

    expected = write_set(tmp_path / "expected", "new", ENTRIES[:3]) | {"notes.txt": old["notes.txt"]}
    assert sweep_swap_failures(root, old, run) == expected


def test_a_committed_swap_is_finished_by_the_next_run_not_discarded(tmp_path: Path) -> None:
    """The bug of the old publish step: the next run threw the finished staging away."""
    root = tmp_path / "data"
    write_set(root, "old")
    new = write_set(tmp_path / "expected", "new")
    with failing_swap(fail_at=7) as steps:  # after the commit (step 3) and train/ moved aside (step 6)
        with pytest.raises(DataError, match=f"swapping in the new data set stopped.*{SWAP_JOURNAL}.*the next `muse-rec synth` run"):
            with staged_swap(root, "synth", ENTRIES) as staging:
                write_set(staging, "new")
    assert steps.fired and not (root / "train").exists() and (root / "test").exists()
    with staged_swap(root, "synth", ENTRIES) as staging:  # the next run finishes the swap first
        assert visible(root) == new
        write_set(staging, "third")
    assert (root / "train" / "metadata.json").read_text() == "third train/metadata.json"
    assert sorted(p.name for p in root.iterdir()) == sorted(ENTRIES)


def test_a_failing_build_leaves_the_old_set_and_no_staging(tmp_path: Path) -> None:
    write_set(tmp_path, "old")
    old = visible(tmp_path)
    with pytest.raises(ValueError, match="bad input"):
        with staged_swap(tmp_path, "prepare", ENTRIES[:3]) as staging:
            write_set(staging, "new")
            raise ValueError("bad input")
    assert visible(tmp_path) == old and sorted(p.name for p in tmp_path.iterdir()) == sorted(ENTRIES)


# -- claiming output directories -------------------------------------------------------------------
def test_an_empty_or_missing_directory_is_claimed_and_marked(tmp_path: Path) -> None:
    assert claim_output_dir(tmp_path / "new", "synth", {"seed": 1}, ENTRIES) == []
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    assert claim_output_dir(tmp_path / "unrelated", "prepare", {}, ENTRIES) == []  # nothing it would replace
    assert atomic._owner(tmp_path / "new") == "synth" and atomic._owner(tmp_path / "unrelated") == "prepare"


@pytest.mark.parametrize(
    "marker, words",
    [
        (None, "holds train/, feature_map/ not written by `muse-rec synth` (there is no .muse_rec-output.json"),
        ('{"command": "prepare"}', "holds a data set written by `muse-rec prepare`: `muse-rec synth` would replace train/, feature_map/."),
        ("{not json", "holds train/, feature_map/ and an unreadable .muse_rec-output.json"),
    ],
)
def test_another_data_set_is_refused_untouched_unless_forced(tmp_path: Path, marker: str | None, words: str) -> None:
    write_set(tmp_path, "theirs", ("train", "feature_map"))
    if marker is not None:
        (tmp_path / MARKER).write_text(marker)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DataError) as error:
        claim_output_dir(tmp_path, "synth", {}, ENTRIES)
    assert str(error.value).startswith(f"{tmp_path} {words}")
    assert str(error.value).endswith("Rerun with --force to replace them, or choose another --out.")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert claim_output_dir(tmp_path, "synth", {}, ENTRIES, force=True) == ["train", "feature_map"]
    assert atomic._owner(tmp_path) == "synth" and (tmp_path / "train" / "metadata.json").exists()  # claiming deletes nothing


def test_a_file_is_not_an_output_directory(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("x")
    with pytest.raises(DataError, match="data: expected a directory for the output of `muse-rec prepare`, found a file"):
        claim_output_dir(tmp_path / "data", "prepare", {}, ENTRIES, force=True)
