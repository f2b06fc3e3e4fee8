"""A hardware profile (`HardwareConfig`) as TorchRec's planner `Topology`.

The one place that talks to TorchRec's topology API. torchrec 1.8 (our CPU machines) and 1.6.1
(the lent GPU host) both have `TopologyFactory`, `TrainerConfig` and `KernelConfig`; they differ
in one point: 1.8 applies a HardwareConfig's bandwidths only with
`KernelConfig(use_hardware_based_bandwidth=True)`, 1.6.1 always (and ignores the flag). Setting the
flag gives the same topology on both. Building `Topology(...)` directly instead works too, but
1.8 warns about it on every run.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torchrec.distributed.planner.types import HardwareConfig as MeasuredHardware
from torchrec.distributed.planner.types import KernelConfig, Topology, TopologyFactory, TrainerConfig

from muse_rec.config import HardwareConfig
from muse_rec.errors import ConfigError

GIB = 1 << 30
BYTES_PER_MS_PER_GB_S = 1e6  # TorchRec's bandwidths are bytes per millisecond; 1 GB/s = 10**9 B/s


def topology_from_profile(hardware: HardwareConfig, device_type: str | None = None, world_size: int | None = None) -> Topology:
    """TorchRec's topology for `hardware`. A running job passes its device type and world size:
    they fill what the profile leaves out and must agree with what it names (a plan for 8 GPUs
    is no plan for 2 CPU ranks). Offline, the profile must name both. Unset caps and bandwidths
    keep TorchRec's defaults, so an empty profile is today's `Topology(world_size, device)`."""
    device = _agree("hardware.device_type", hardware.device_type, device_type)
    ranks = _agree("hardware.world_size", hardware.world_size, world_size)
    trainer = TrainerConfig(
        world_size=ranks,
        local_world_size=hardware.local_world_size,
        hbm_cap_bytes=_bytes(hardware.hbm_cap_gib),
        ddr_cap_bytes=_bytes(hardware.ddr_cap_gib),
    )
    measured = MeasuredHardware(
        intra_host_bw=_per_ms(hardware.intra_host_bw_gb_s),
        inter_host_bw=_per_ms(hardware.inter_host_bw_gb_s),
        hbm_mem_bw=_per_ms(hardware.hbm_bw_gb_s),
        ddr_mem_bw=_per_ms(hardware.ddr_bw_gb_s),
        hbm_to_ddr_mem_bw=_per_ms(hardware.host_to_device_bw_gb_s),
    )
    kernel = KernelConfig(compute_device=device, use_hardware_based_bandwidth=True)
    return TopologyFactory.create_topology(trainer_config=trainer, hardware_config=measured, kernel_config=kernel)


def running_hardware(hardware: HardwareConfig, device_type: str, device_memory_bytes: int | None, env: Mapping[str, str]) -> HardwareConfig:
    """`hardware` with what a running CUDA job knows filled in where the profile leaves it unset:
    the device memory of its GPU (`device_memory_bytes`, torch.cuda.get_device_properties().total_memory)
    as `hbm_cap_gib`, and torchrun's LOCAL_WORLD_SIZE (from `env`) as `local_world_size`. The cap is
    the card's whole memory, as the profiles give it (h100x1: 79.6 GiB): the planner keeps its own
    reserve (RESERVED_SHARE of it, besides the dense estimate), which also covers the CUDA context.
    Without this, TorchRec would plan into its default 32 GiB on any card. Profile values win; on
    CPU (host memory, processes per host) nothing changes."""
    if device_type != "cuda":
        return hardware
    filled = {}
    if hardware.hbm_cap_gib is None and device_memory_bytes:
        filled["hbm_cap_gib"] = device_memory_bytes / GIB
    if hardware.local_world_size is None and env.get("LOCAL_WORLD_SIZE"):
        value = env["LOCAL_WORLD_SIZE"]
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"LOCAL_WORLD_SIZE={value!r} is not a positive number of ranks per host")
        filled["local_world_size"] = int(value)
    return dataclasses.replace(hardware, **filled) if filled else hardware


def _agree(key: str, profile, running):
    if profile is None and running is None:
        raise ConfigError(f"{key} is not set: planning without a running job needs a hardware profile (configs/hardware/*.yaml)")
    if profile is not None and running is not None and profile != running:
        raise ConfigError(
            f"{key} is {profile!r} in the hardware profile but this job runs with {running!r}: "
            "use the profile of the hardware you run on, or none"
        )
    return running if profile is None else profile


def _bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * GIB)


def _per_ms(gb_s: float | None) -> float | None:
    return None if gb_s is None else gb_s * BYTES_PER_MS_PER_GB_S
