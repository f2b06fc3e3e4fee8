"""Shared fixtures: the real ten-row TAOBAO-MM tables and a small synthetic data set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from muse_rec.config import SynthConfig

DEMO_DIR = Path(os.environ.get("MUSE_REC_DEMO_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "taobao-mm-demo"))
"""The real ten-row tables: in the shared/ folder beside the checkout, or where MUSE_REC_DEMO_DIR says."""

SMALL_SYNTH = SynthConfig(
    seed=7,
    train_users=60,
    test_users=40,
    items=5000,
    categories=20,
    clusters_per_category=3,
    rows_per_shard=300,
    row_group_rows=100,
    raw=True,
)
"""Several shards and row groups per split, ragged last ones, raw tables too: seconds to write."""


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    if not DEMO_DIR.is_dir():
        pytest.fail(f"the real demo tables are expected in {DEMO_DIR} (the shared/ folder beside the checkout, or set MUSE_REC_DEMO_DIR)")
    return DEMO_DIR


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data set in the released layout, shared by the whole session (read-only)."""
    from muse_rec.data.synth import synthesize

    root = tmp_path_factory.mktemp("synthetic")
    synthesize(SMALL_SYNTH, root, progress=False)
    return root
