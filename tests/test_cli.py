"""The `muse-rec` commands as a user runs them (in process: same code path, no extra interpreter)."""
from __future__ import annotations

import json
import shutil

import pytest

from muse_rec.cli import main
from muse_rec.data.atomic import MARKER
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


def files(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_over_a_prepared_data_set_is_refused_and_replaced_only_with_force(demo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "--quiet", "--raw", str(demo_dir), "--out", str(out)]) == 0
    before = files(out)
    assert main(["synth", "--quiet", "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"muse-rec synth: error: {out} holds a data set written by `muse-rec prepare`" in err
    assert "Rerun with --force to replace them, or choose another --out." in err
    assert files(out) == before
    assert main(["synth", "--quiet", "--force", "--out", str(out), *SMALL]) == 0
    assert "synth" in DatasetLayout(out).read_metadata("train") and main(["verify", "--quiet", str(out)]) == 0


def test_quickstart_refuses_a_downloaded_data_root_before_training(tmp_path, capsys, monkeypatch):
    """`quickstart --config configs/muse.yaml` synthesizes into data.root, where the downloads go."""
    root = tmp_path / "taobao-mm"
    (root / "train").mkdir(parents=True)
    (root / "train" / "train-shard-000000.parquet").write_bytes(b"139 GB of downloads")
    (root / MARKER).write_text('{"command": "download"}')
    monkeypatch.setattr("subprocess.run", lambda *args, **kwargs: pytest.fail("training was launched"))
    assert main(["quickstart", "--quiet", f"data.root={root}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"muse-rec quickstart: error: {root} holds a data set written by `muse-rec download`: `muse-rec synth` would replace train/." in err
    assert "Rerun with --force to replace them, or set data.root=DIR to a directory for the synthetic set." in err
    assert (root / "train" / "train-shard-000000.parquet").read_bytes() == b"139 GB of downloads"


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
        help_text = " ".join(capsys.readouterr().out.split())
        if command in ("quickstart", "synth", "prepare", "download"):  # the writing commands say what --force replaces
            assert "--force" in help_text and "did not write" in help_text
