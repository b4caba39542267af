"""Load a trainer checkpoint into one process, whatever tensor/pipeline layout it was saved with.

megatron-core's dist_checkpointing stores every tensor under a global key with its global shape,
so a model built with TP = PP = 1 loads the full (merged) weights of any TP/PP checkpoint. The
architecture, vocabulary and recipe come from the configuration saved in the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile

import torch
import torch.distributed as dist

from megatron_averis.recipes import OperandRecipe, Recipe, get_recipe
from megatron_averis.training import checkpoint_integrity as integrity


def resolve_device(name: str) -> torch.device:
    """The --device of a diagnostics tool, refused before any work when this process cannot run
    the model there. A CPU model in a process that sees CUDA does not work: megatron-core's RoPE
    moves its frequency table to the current CUDA device on first use."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available; pass --device cpu")
    if device.type == "cpu" and torch.cuda.is_available():
        raise RuntimeError("--device cpu in a process that sees CUDA devices: megatron-core's RoPE "
                           "would move its tables to the GPU. Hide the GPUs for a CPU run "
                           "(CUDA_VISIBLE_DEVICES= python3 ...) or pass --device cuda")
    return device


@contextlib.contextmanager
def single_process():
    """torch.distributed (gloo, world size 1, file rendezvous) and megatron-core's parallel state
    with every parallel size 1, for the duration of the block; an existing set-up is reused."""
    from megatron.core import parallel_state

    created_group = not dist.is_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        if created_group:
            dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                    rank=0, world_size=1)
        if dist.get_world_size() != 1:
            raise RuntimeError("checkpoint tools run in one process; launch them without torchrun")
        created_state = not parallel_state.model_parallel_is_initialized()
        if created_state:
            parallel_state.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            if created_state:
                parallel_state.destroy_model_parallel()
            if created_group:
                dist.destroy_process_group()


def recipe_from_dict(d: dict) -> Recipe:
    """Inverse of dataclasses.asdict(recipe) (the form saved in the run configuration)."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"the saved recipe has fields this version does not know: {sorted(unknown)}")
    return Recipe(**{k: OperandRecipe(**v) if isinstance(v, dict) else v for k, v in d.items()})


@dataclasses.dataclass
class CheckpointInfo:
    path: str        # the checkpoint directory
    iteration: int
    config: dict     # the run configuration saved with it


def find(load: str, step: int | None = None) -> CheckpointInfo:
    """A checkpoint from a --save directory (the latest, or iteration `step`) or a checkpoint
    directory itself."""
    from megatron.core import dist_checkpointing

    from megatron_averis.training.checkpoint_dirs import find_checkpoint

    found = find_checkpoint(load, step)
    if found is None:
        raise FileNotFoundError(f"{load!r} holds no checkpoint; give the trainer's --save "
                                "directory or one of its iter_* directories")
    iteration, path = found
    problems = integrity.check(path)
    if problems:
        raise integrity.CheckpointDamaged(path, "; ".join(problems))
    common = dist_checkpointing.load_common_state_dict(path)
    if "config" not in common:
        raise ValueError(f"{path} has no run configuration; it was not written by "
                         "megatron_averis.pretrain")
    return CheckpointInfo(path, common["iteration"] if iteration is None else iteration,
                          common["config"])


def list_checkpoints(save_dir: str) -> list[CheckpointInfo]:
    """Every committed checkpoint of a --save directory, by iteration."""
    from megatron_averis.training.checkpoint_dirs import committed_checkpoints

    if not os.path.isdir(save_dir):
        raise FileNotFoundError(f"{save_dir!r} is not a directory")
    steps = [iteration for iteration, _ in committed_checkpoints(save_dir)]
    if not steps:
        raise FileNotFoundError(f"{save_dir!r} holds no complete checkpoint")
    return [find(save_dir, s) for s in steps]


def model_config(config: dict, *, recipe: Recipe | None = None, bf16: bool | None = None):
    """The ModelConfig of a saved run configuration, for one process (TP = PP = 1, our layers)."""
    from megatron_averis.training.config import ModelConfig
    from megatron_averis.training.presets import ModelArch

    return ModelConfig(
        arch=ModelArch(**config["arch"]),
        recipe=recipe if recipe is not None else recipe_from_dict(config["recipe"]),
        bf16=config["bf16"] if bf16 is None else bf16,
        padded_vocab_size=config["padded_vocab_size"],
    )


def build_model(config: dict, *, recipe: Recipe | str | None = None, bf16: bool | None = None,
                device: torch.device | str = "cpu"):
    """The run's GPTModel in this process (inside `single_process()`); random weights. It is
    built as on a CPU-only machine (weights initialised from torch's CPU generator, so no CUDA
    RNG tracker is needed; no fused kernels) and then moved to `device`."""
    from megatron_averis.training.model import build_model as trainer_build_model
    from megatron_averis.training.model import transformer_config

    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    cpu = torch.device("cpu")
    cfg = model_config(config, recipe=recipe, bf16=bf16)
    return trainer_build_model(cfg, transformer_config(cfg, cpu), cpu)[0].to(device)


def load_model(info: CheckpointInfo, *, recipe: Recipe | str | None = None,
               device: torch.device | str = "cpu"):
    """The checkpoint's model (merged to TP = PP = 1) in eval mode, inside `single_process()`.
    recipe: the GEMM recipe to run it under (default: the one it was trained with)."""
    from megatron.core import dist_checkpointing

    from megatron_averis.training.cpu_compat import cpu_training

    with cpu_training():
        model = build_model(info.config, recipe=recipe)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, info.path)
        model.load_state_dict(loaded["model"])
    return model.to(device).eval()
