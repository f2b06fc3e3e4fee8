"""TorchX component that launches `muse-rec train` on any TorchX scheduler.

`train` is built on TorchX's `dist.ddp` component, so the job runs under `torchrun`. TorchX's
rendezvous wiring comes with it: c10d on `localhost:0` for one node, and
`$TORCHX_RANK0_HOST:<rdzv_port>` for several nodes. Each worker runs
`python -m muse_rec.cli train [--config C] [overrides...]` and reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT from torchrun, using gloo on CPU and NCCL on CUDA.

Arguments that come after `--` go to `muse-rec train` unchanged: `key=value` config overrides,
and flags such as `--quiet`. Component options (`--nproc_per_node`, `--config`, ...) must come
before the `--`. Run `torchx run launch/components.py:train --help` for every option.

`torchrun` and `python` must be the ones from the environment that has muse_rec installed.
Activate it first: `source .venv/bin/activate` (the venv that launch/install.sh creates).

Local, 2 CPU processes, run from the repo root (`local_cwd` ignores `--image`; the job runs in
the current directory):

    torchx run -s local_cwd launch/components.py:train --nproc_per_node 2 -- \\
        data.root=data/synthetic data.batch_size=500 train.out=runs/local

With a config file:

    torchx run -s local_cwd launch/components.py:train --config configs/muse.yaml -- \\
        --quiet data.root=/data/taobao-mm train.out=runs/muse

One host with 8 GPUs (one rank per GPU; NCCL is chosen automatically when CUDA is available):

    torchx run -s local_cwd launch/components.py:train --nproc_per_node 8 --gpu 8 \\
        --config configs/muse.yaml -- data.root=/data/taobao-mm train.out=runs/muse-8gpu

Slurm, 2 nodes x 8 GPUs (the job runs in the submit directory, or use `-cfg job_dir=...`; each
node needs the same venv and data paths):

    torchx run -s slurm -cfg partition=gpu,time=12:00:00 launch/components.py:train \\
        --nnodes 2 --nproc_per_node 8 --gpu 8 --cpu 64 --memMB 480000 \\
        --config configs/muse.yaml -- data.root=/shared/taobao-mm train.out=/shared/runs/muse

Kubernetes (Volcano), 2 pods x 8 GPUs, from a container image that has muse_rec installed:

    torchx run -s kubernetes -cfg queue=default,namespace=ml launch/components.py:train \\
        --image registry.example.com/muse-rec:latest --nnodes 2 --nproc_per_node 8 --gpu 8 \\
        --cpu 64 --memMB 480000 --config configs/muse.yaml -- \\
        data.root=/mnt/data/taobao-mm train.out=/mnt/runs/muse

Add `--dryrun` after `torchx run` to print the job without submitting it. The plain torchrun
equivalent of the local example is:

    torchrun --standalone --nnodes 1 --nproc_per_node 2 -m muse_rec.cli train \\
        data.root=data/synthetic data.batch_size=500 train.out=runs/local

and for several nodes (run on every node):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint $HEAD_HOST:29500 --rdzv_id muse -m muse_rec.cli train --config ...

TorchX reads this file with its own linter and `exec`s it, so the annotations below use
`typing.Optional` and `typing.Dict` (TorchX 0.7.0 does not accept `X | None`). For the same
reason the module must not use `from __future__ import annotations`, and must not depend on
`__file__`.
"""
import os
from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

MODULE = "muse_rec.cli"
"""The Python module each rank runs (`python -m muse_rec.cli train ...`)."""
ROLE = "trainer"
"""The job's one role (its replicas are the nodes); TorchX names log folders after it."""


def train(
    *overrides: str,
    config: Optional[str] = None,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = os.getcwd(),
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    name: str = "muse-rec-train",
) -> specs.AppDef:
    """Train a muse_rec model (`muse-rec train`) with torchrun on nnodes x nproc_per_node ranks.

    Args:
        overrides: arguments for `muse-rec train`, after `--`: config overrides such as
            `data.root=/data train.out=runs/x data.batch_size=500`, and flags such as `--quiet`
        config: YAML config file (see configs/), as seen from the job's working directory;
            if not given, the built-in defaults are used
        nnodes: number of nodes (hosts, or replicas of the role)
        nproc_per_node: ranks per node; on GPU hosts, at most the number of GPUs per node
        image: where the job runs. For local_cwd and slurm, a directory (default: the current
            directory); for docker and kubernetes, a container image with muse_rec installed
        cpu: CPUs per node (ignored if h is given)
        gpu: GPUs per node, usually equal to nproc_per_node on GPU hosts (ignored if h is given)
        memMB: CPU memory per node in MB (ignored if h is given)
        h: a registered named resource, such as `aws_p4d.24xlarge`; if given, it overrides
            cpu, gpu and memMB
        max_retries: how many times the scheduler may retry the job after a failure. A retried
            job resumes from the run's newest checkpoint
        rdzv_port: port for the c10d rendezvous store on rank 0's host. It is used only with
            several nodes; a single node picks a free port itself
        env: extra environment variables for every rank, for example `NCCL_DEBUG=INFO,LOGLEVEL=INFO`
        name: job name, `{experiment}/{run}` or `{run}`
    """
    args = ["train", *(["--config", config] if config else []), *overrides]
    app = ddp(
        *args,
        m=MODULE,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=dict(env) if env else None,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
    app.roles[0].name = ROLE  # ddp names the role after the module's last part ("cli")
    return app
