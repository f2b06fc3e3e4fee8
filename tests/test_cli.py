"""The `muse-rec` commands as a user runs them (in process: same code path, no extra interpreter)."""
from __future__ import annotations

import json
import shutil

import pytest

from muse_rec.cli import main
from muse_rec.data.layout import DatasetLayout

SMALL = ["synth.train_users=30", "synth.test_users=10", "synth.items=3000", "synth.categories=10", "synth.row_group_rows=100"]


def test_quickstart_synthesizes_trains_on_two_ranks_and_reports(tmp_path, capfd):
    run_dir = tmp_path / "run"
    args = ["quickstart", "--quiet", f"data.root={tmp_path / 'data'}", "data.batch_size=64", f"train.out={run_dir}", *SMALL]
    assert main(args) == 0
    out = capfd.readouterr().out
    assert "test: AUC 0." in out and "GAUC 0." in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "test" and records[-1]["rows"] == json.loads((tmp_path / "data" / "test" / "metadata.json").read_text())["total_rows"]
    assert DatasetLayout(tmp_path / "data").shards("train")


def test_synth_verify_stream_round(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["synth", "--quiet", "--out", str(root), *SMALL]) == 0
    assert main(["verify", "--quiet", str(root)]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    assert main(["stream", "--quiet", "--splits", "test", f"data.root={root}", "data.batch_size=32"]) == 0
    assert "test: " in capsys.readouterr().out
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    assert main(["verify", "--quiet", str(root)]) == 1


def test_prepare_on_the_real_demo_tables(demo_dir, tmp_path, capsys):
    assert main(["prepare", "--quiet", "--raw", str(demo_dir), "--out", str(tmp_path / "out")]) == 0
    assert "prepared data set written to" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "train" / "metadata.json").read_text())
    assert meta["total_rows"] == 10


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["stream", f"data.root={tmp_path}", "data.batch_sise=3"]) == 2
    assert "unknown config key data.batch_sise" in capsys.readouterr().err
    assert main(["stream", "--quiet", f"data.root={tmp_path}"]) == 2
    assert "missing" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for command in ("quickstart", "config", "synth", "stream", "prepare", "download", "verify"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
