"""Config loading: YAML + overrides into typed dataclasses, errors that name the key, docs for every key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from muse_rec.config import Config, describe, load_config
from muse_rec.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 500\n  vocab: full\nsynth:\n  click_bias: -2\n")
    config = load_config(path, ["data.batch_size=64", "synth.seed=3", "data.root=/x/y"])
    assert (config.data.batch_size, config.data.vocab, config.data.root) == (64, "full", "/x/y")
    assert config.synth.seed == 3 and config.synth.click_bias == -2.0 and isinstance(config.synth.click_bias, float)
    assert config.synth.items == Config().synth.items  # untouched keys keep their defaults


def test_override_text_stays_text_for_text_keys_and_1e_4_is_a_float():
    config = load_config(None, ["data.root=2024", "train.out=yes", "model.lemur.encoder_checkpoint=null", "optim.encoder_lr=1e-4"])
    assert (config.data.root, config.train.out, config.model.lemur.encoder_checkpoint) == ("2024", "yes", None)
    assert config.optim.encoder_lr == 1e-4
    assert load_config(None, ["model.lemur.encoder_checkpoint=3"]).model.lemur.encoder_checkpoint == "3"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batchsize=5", "unknown config key data.batchsize"),
        ("model.dim=5", "unknown config key model.dim"),
        ("data.batch_size=1.5", "config key data.batch_size: expected int, found float 1.5"),
        ("data.batch_size=true", "config key data.batch_size: expected int, found bool True"),
        ("data.strict=3", "config key data.strict: expected bool, found int 3"),
        ("data.vocab=p50", "config key data.vocab: expected one of 'p90', 'full', found 'p50'"),
        ("data=3", "config key data: expected a section"),
        ("data.root.sub=1", "config key data.root: expected str"),
        ("nonsense", "override 'nonsense': expected key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("synth:\n  itmes: 5\n")
    with pytest.raises(ConfigError, match="unknown config key synth.itmes"):
        load_config(tmp_path / "typo.yaml")


def test_every_key_is_documented():
    def walk(obj):
        for f in dataclasses.fields(obj):
            assert f.metadata.get("doc"), f"config key {f.name} has no documentation"
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                walk(getattr(obj, f.name))

    walk(Config())
    text = "\n".join(describe(Config()))
    assert "  batch_size: 1000" in text and "# Samples per batch on each rank." in text


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.method=lemur", "model.gsu_stage=loader"], "model.gsu_stage"),
        (["data.long_seq_len=40", "model.keep_top=50"], "model.keep_top"),
        (["data.long_seq_len=40", "model.method=din", "model.keep_top=50"], "model.short_seq_len"),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key {key}:"):
        load_config(None, overrides)


@pytest.mark.parametrize("method,stage", [("muse", "loader"), ("sim_hard", "loader"), ("din", "loader"), ("sim_soft", "loader"), ("lemur", "model")])
def test_gsu_stage_null_runs_the_gsu_in_the_loader_except_for_lemur(method, stage):
    assert load_config(None, [f"model.method={method}"]).model.stage == stage
    assert load_config(None, [f"model.method={method}", "model.gsu_stage=model"]).model.stage == "model"
