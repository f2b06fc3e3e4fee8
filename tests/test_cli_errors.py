"""Every command a new user types, each with one wrong value: a one-line error that names what is
wrong (the key, file or argument) and a non-zero exit, never a traceback. In process where the
command does not join a process group; `train` past its config runs in a process of its own."""
from __future__ import annotations

import subprocess
import sys

import pytest

from muse_rec.cli import main

# (command line, exit code, text the error must hold); {tmp} is an empty directory, {file} a plain
# file, {demo} the real demo tables, {missing} a path that does not exist.
MISTAKES = [
    ("config model.keep_top=2000", 2, "model.keep_top: expected at most data.long_seq_len = 1000"),
    ("config model.short_seq_len=2000", 2, "model.short_seq_len: expected at most data.long_seq_len"),
    ("config data.read_ahead=2", 2, "data.read_ahead: expected 0 with data.num_workers = 1"),
    ("config data.batch_size=0", 2, "data.batch_size: expected at least 1, found 0"),
    ("config data.batch_size=many", 2, "data.batch_size: expected int"),
    ("config model.method=dien", 2, "model.method: expected one of"),
    ("config model.embedding_dim=15", 2, "model.embedding_dim: expected an even number"),
    ("config model.lemur.encode_share=0.5", 2, "model.lemur.backward_share: expected at most model.lemur.encode_share"),
    ("config model.lemur.encode_share=1.5", 2, "model.lemur.encode_share: expected a value in [0, 1]"),
    ("config model.lemur.heads=3", 2, "model.lemur.width: expected a multiple of model.lemur.heads = 3"),
    ("config train.keep_checkpoints=0", 2, "train.keep_checkpoints: expected at least 1"),
    ("config data.batch_sise=3", 2, "unknown config key data.batch_sise"),
    ("config --config {missing}/muse.yaml", 2, "does not exist"),
    ("train --hardware h200x9", 2, "hardware profile 'h200x9': no such file"),
    ("train data.long_seq_len=10", 2, "model.keep_top: expected at most data.long_seq_len = 10"),
    ("plan --hardware h200x9", 2, "hardware profile 'h200x9'"),
    ("plan --hardware h100x8 --out {file}/plans", 2, "Not a directory"),
    ("eval --checkpoint {missing}", 2, "not a muse_rec checkpoint"),
    ("synth --out {tmp} synth.items=10", 2, "synth.items: expected at least"),
    ("stream data.root={missing}", 2, "data directory missing"),
    ("stream data.root={tmp}", 2, "empty data directory"),
    ("stream --splits validation data.root={tmp}", 2, "unknown split 'validation'"),
    ("prepare --raw {missing} --out {tmp}/out", 2, "train_samples.parquet: missing"),
    ("prepare --raw {demo} --out {tmp}/out --coverage 2", 2, "coverage"),
    ("prepare --raw {demo} --out {tmp}/out --rows-per-shard 0", 2, "--rows-per-shard: expected at least 1, found 0"),
    ("download --dest {tmp} --max-shards 0", 2, "--max-shards: expected at least 1, found 0"),
    ("download --dest {tmp} --vocab p80", 2, "--vocab: invalid choice"),
    ("download --dest {tmp} --splits validation", 2, "unknown split(s) ['validation']"),
    ("synth --out {file}", 2, "Not a directory"),
    ("verify {missing}", 1, "not a directory"),
    ("quickstart --nproc 0", 2, "--nproc: expected at least 1, found 0"),
    ("quickstart data.batch_size=-5", 2, "data.batch_size: expected at least 1, found -5"),
]


@pytest.fixture
def places(tmp_path, demo_dir) -> dict[str, str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a directory\n")
    return {"tmp": str(tmp_path / "empty"), "file": str(tmp_path / "file"), "demo": str(demo_dir), "missing": str(tmp_path / "missing")}


@pytest.mark.parametrize(("line", "code", "text"), MISTAKES, ids=[m[0].split(" {")[0] for m in MISTAKES])
def test_one_wrong_value_is_a_clear_error(line, code, text, places, capsys):
    argv = [part.format(**places) for part in line.split()]
    try:
        returned = main([argv[0], "--quiet", *argv[1:]])
    except SystemExit as e:  # argparse refuses an argument before any command runs
        returned = e.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert returned == code, output
    assert text in output, output
    assert "Traceback" not in output


def test_train_on_a_missing_data_directory_is_a_clear_error(tmp_path):
    """`train` joins a process group before it reads data: a process of its own, as a user runs it."""
    missing = tmp_path / "missing"
    done = subprocess.run(
        [sys.executable, "-m", "muse_rec.cli", "train", "--quiet", f"data.root={missing}", f"train.out={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert str(missing) in done.stderr and "Traceback" not in done.stderr
