"""The gloo process group of a test's worker processes."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

from muse_rec.train.loop import shutdown_distributed


@contextlib.contextmanager
def gloo_group(init_file, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """Join a file-initialised gloo group and leave it as the trainer does (`shutdown_distributed`:
    a barrier first, so that no rank exits while a gloo worker thread still holds work, such as a
    train pipeline's prefetched all-to-all; that work released during interpreter exit aborts the
    process with SIGABRT). After an error the group is only destroyed: the other ranks may never
    reach a barrier."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown_distributed()
