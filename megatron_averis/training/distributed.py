"""Process group and megatron-core parallel state from torchrun's environment.

torchrun (single or multi node: --nnodes/--node-rank/--master-addr, or SLURM's srun wrapping it)
exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A plain `python -m` launch is
one process: RANK 0 of WORLD_SIZE 1 on a free local port. With CUDA each process drives the GPU of
its LOCAL_RANK over NCCL; without CUDA the processes talk over gloo (tests, CI).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_averis.training.config import TrainingConfig


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launched_by_torchrun: bool

    @classmethod
    def from_environ(cls) -> "LaunchEnv":
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True)
        return cls(0, 1, 0, False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(env: LaunchEnv) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK {env.local_rank} but this node has {count} GPUs; launch at "
                           f"most {count} processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", env.local_rank)


def initialize(cfg: TrainingConfig, env: LaunchEnv, device: torch.device) -> None:
    """torch.distributed and megatron-core's tensor/pipeline/data-parallel groups."""
    if not env.launched_by_torchrun:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    parallel = cfg.parallel
    backend = parallel.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("--distributed-backend nccl needs CUDA; this machine has none (use gloo)")
    timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds NCCL communicators to this GPU eagerly
    torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                         timeout=timeout, **kwargs)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.model.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.model.pipeline_model_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
