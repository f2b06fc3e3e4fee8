"""The TorchX component in launch/components.py: the job it builds, and a real 2-process CPU launch."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchx", reason="torchx is not installed (it is listed in launch/requirements.txt)")

from torchx.specs.builders import materialize_appdef  # noqa: E402
from torchx.specs.finder import get_component  # noqa: E402

from muse_rec.config import SynthConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPONENT_FILE = REPO / "launch" / "components.py"


def _load_components():
    spec = importlib.util.spec_from_file_location("muse_rec_launch_components", COMPONENT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


components = _load_components()


def _command(app) -> list[str]:
    """The torchrun command line of the app's only role (ddp wraps it in `bash -c`)."""
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return shlex.split(role.args[1])


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _worker_args(command: list[str]) -> list[str]:
    """What follows `-m muse_rec.cli`: the arguments of `muse-rec train`."""
    at = command.index("-m")
    assert command[at + 1] == "muse_rec.cli"
    return command[at + 2:]


def test_defaults_run_train_on_one_node_with_two_ranks():
    app = components.train()
    (role,) = app.roles
    command = _command(app)
    assert command[0] == "torchrun"
    assert _option(command, "--nnodes") == "1" and _option(command, "--nproc_per_node") == "2"
    assert _option(command, "--rdzv_endpoint") == "localhost:0"  # one node: torchrun picks a free port
    assert _worker_args(command) == ["train"]
    assert role.num_replicas == 1 and role.max_retries == 0
    assert role.resource.gpu == 0 and role.resource.cpu > 0 and role.resource.memMB > 0
    assert app.name == "muse-rec-train" and role.name == components.ROLE


def test_config_overrides_resources_and_nodes_pass_through():
    overrides = ("--quiet", "data.root=/data/taobao mm", "train.out=runs/x")
    app = components.train(
        *overrides, config="configs/muse.yaml", nnodes=2, nproc_per_node=8, gpu=8, cpu=64, memMB=480000,
        max_retries=3, rdzv_port=29600, env={"NCCL_DEBUG": "INFO"}, image="registry/muse-rec:1", name="exp/run1",
    )
    (role,) = app.roles
    command = _command(app)
    assert _option(command, "--nnodes") == "2" and _option(command, "--nproc_per_node") == "8"
    assert _option(command, "--rdzv_endpoint").endswith(":29600")  # several nodes: rank 0's host
    assert _worker_args(command) == ["train", "--config", "configs/muse.yaml", *overrides]
    assert role.num_replicas == 2 and role.max_retries == 3 and role.image == "registry/muse-rec:1"
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (64, 8, 480000)
    assert role.env["NCCL_DEBUG"] == "INFO" and role.port_map == {"c10d": 29600}
    assert app.name == "run1"


def test_named_resource_wins_and_env_is_not_mutated():
    env = {"A": "1"}
    app = components.train(h="aws_p3.8xlarge", gpu=1, env=env)
    assert app.roles[0].resource.gpu == 4  # the named resource, not gpu=1
    assert env == {"A": "1"}


def test_torchx_cli_accepts_the_component_and_passes_args_after_double_dash():
    """The same path `torchx run launch/components.py:train ...` takes: TorchX's linter and parser."""
    component = get_component(str(COMPONENT_FILE) + ":train")
    assert component.validation_errors == []
    app = materialize_appdef(component.fn, [
        "--nproc_per_node", "3", "--config", "c.yaml", "--env", "A=1,B=2", "--",
        "--quiet", "data.root=/d", "data.batch_size=64",
    ])
    command = _command(app)
    assert _option(command, "--nproc_per_node") == "3"
    assert _worker_args(command) == ["train", "--config", "c.yaml", "--quiet", "data.root=/d", "data.batch_size=64"]
    assert {"A": "1", "B": "2"}.items() <= app.roles[0].env.items()


def test_torchx_local_cwd_launch_trains_on_two_cpu_ranks(tmp_path):
    from muse_rec.data.synth import synthesize

    root = tmp_path / "data"
    synthesize(SynthConfig(train_users=30, test_users=10, items=3000, categories=10, row_group_rows=100), root, progress=False)
    run_dir = tmp_path / "run"

    bin_dir = Path(sys.executable).parent  # the venv's: its torchrun runs the workers
    assert (bin_dir / "torchrun").exists(), f"torchrun is missing beside {sys.executable}"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx'}",
        "launch/components.py:train", "--nproc_per_node", "2", "--",
        f"data.root={root}", "data.batch_size=64", "data.num_workers=0", f"train.out={run_dir}",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, output

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert records[-1]["split"] == "test" and 0.0 <= records[-1]["auc"] <= 1.0, records[-1]
    assert f"{components.ROLE}/0 [1]:" in done.stdout + done.stderr, output  # rank 1's lines, as torchx tags them
