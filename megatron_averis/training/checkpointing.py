"""Save and resume with megatron-core dist_checkpointing: complete and atomic.

A checkpoint holds the model, the optimizer (FP32 main parameters and Adam moments, sharded the
way the optimizer is), the LR scheduler, every RNG stream of every rank (rng_state.py), the data
position (consumed samples; data order is a function of the seed) and the full configuration.
Directory layout and atomic commit: checkpoint_dirs.py.
"""

from __future__ import annotations

import contextlib
import time

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_averis.training import checkpoint_dirs, rng_state

# Fields of the configuration that must match for a checkpoint to load into this model.
_ARCH_MUST_MATCH = ("arch", "padded_vocab_size")


def _layout() -> list[int]:
    return [parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size()]


def _rank_coords() -> tuple[int, int, int]:
    return (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank())


class Checkpointer:
    """Saves and loads the whole training state of this process's model chunks."""

    def __init__(self, args, model_chunks, optimizer, scheduler, config_dict: dict):
        self.args = args
        self.model = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config_dict = config_dict
        self._optim_metadata = {
            "distrib_optim_sharding_type": ("fully_reshardable"
                                            if args.dist_ckpt_optim_fully_reshardable
                                            else "dp_reshardable"),
        }

    def _sharded_state_dict(self, *, is_loading: bool, optimizer: bool, rng: bool,
                            train_state: dict | None = None) -> dict:
        # The models' own keys, without the DDP wrapper's "module." prefix.
        if len(self.model) == 1:
            state = {"model": self.model[0].module.sharded_state_dict()}
        else:
            state = {f"model{i}": m.module.sharded_state_dict() for i, m in enumerate(self.model)}
        if optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state, is_loading=is_loading, metadata=self._optim_metadata)
        state["scheduler"] = self.scheduler.state_dict()
        state["train_state"] = dict(train_state or {})
        state["config"] = self.config_dict
        state["parallel_layout"] = _layout()
        if rng:
            # One object per rank: TP ranks differ in their tracker streams, DP ranks may differ
            # in Python/NumPy state and stochastic-rounding counters do not, but keeping every
            # rank's own state makes the resume exact without reasoning about which are equal.
            state["rng_state"] = ShardedObject("rng_state", rng_state.capture(self.model),
                                               tuple(_layout()), _rank_coords(), replica_id=0)
        return state

    def save(self, iteration: int, train_state: dict) -> tuple[str, float]:
        """Write a checkpoint of `iteration`; returns (directory, seconds). Collective."""
        start = time.monotonic()
        root = self.args.save
        rank = torch.distributed.get_rank()
        if rank == 0:
            checkpoint_dirs.prepare_temp_dir(root, iteration)
        torch.distributed.barrier()
        state = self._sharded_state_dict(is_loading=False, optimizer=True, rng=True,
                                         train_state=train_state)
        # Replicated tensors are written by one data-parallel rank each, spread over the group.
        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(),
            parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist_checkpointing.save(state, checkpoint_dirs.temp_dir(root, iteration),
                                sharded_strategy=strategy)
        torch.distributed.barrier()  # every rank's files are written before the commit
        final = [None]
        if rank == 0:
            final[0] = checkpoint_dirs.commit(root, iteration, train_state)
        torch.distributed.broadcast_object_list(final, src=0)
        return final[0], time.monotonic() - start

    def load(self) -> dict | None:
        """Restore everything from --load; returns the saved train state, or None when --load
        holds no checkpoint yet (a fresh start). Collective."""
        found = checkpoint_dirs.find_checkpoint(self.args.load, self.args.ckpt_step)
        if found is None:
            return None
        iteration, path = found
        common = dist_checkpointing.load_common_state_dict(path)
        self._check_compatible(common["config"], path)
        load_rng = not self.args.no_load_rng and common["parallel_layout"] == _layout()
        load_optim = not self.args.no_load_optim
        if load_optim:
            _materialize_optimizer_state(self.optimizer)
        state = self._sharded_state_dict(is_loading=True, optimizer=load_optim, rng=load_rng)
        loaded = dist_checkpointing.load(state, path)
        if len(self.model) == 1:
            self.model[0].load_state_dict(loaded["model"])
        else:
            for i, m in enumerate(self.model):
                m.load_state_dict(loaded[f"model{i}"])
        if load_optim:
            # Restoring state is no autograd operation (Module.load_state_dict does the same). It
            # matters with FP32 parameters and the distributed optimizer, whose main parameters
            # are views of the model's leaf parameters: copying into them with grad mode on fails.
            with torch.no_grad(), _step_kept_where_not_loaded(self.optimizer):
                self.optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(self.optimizer)
        self.scheduler.load_state_dict(loaded["scheduler"])
        if load_rng:
            rng_state.restore(loaded["rng_state"], self.model)
        train_state = dict(loaded["train_state"])
        train_state["loaded_from"] = path
        train_state["rng_restored"] = load_rng
        train_state["optimizer_restored"] = load_optim
        assert train_state["iteration"] == iteration, (train_state["iteration"], iteration)
        return train_state

    def _check_compatible(self, saved: dict, path: str) -> None:
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {self.config_dict.get(k)!r}"
                 for k in _ARCH_MUST_MATCH if saved.get(k) != self.config_dict.get(k)]
        if diffs:
            raise ValueError(f"checkpoint {path} was trained with a different model; "
                             "use the same --model-preset / architecture flags and tokenizer:\n  "
                             + "\n  ".join(diffs))


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors before building the loading template.

    megatron-core's DistributedOptimizer describes its state from the inner optimizer's state
    (without Apex/TE it even reads the Adam step from it), which a torch optimizer creates only
    in its first step. Create Adam's state as that step would (step 0, zero moments) without
    touching any parameter; the checkpoint then overwrites the moments and main parameters, and
    _restore_adam_steps the step."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or len(inner.state) > 0:
            continue  # the trainer builds Adam; other optimizers have other state
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


@contextlib.contextmanager
def _step_kept_where_not_loaded(optimizer):
    """Let megatron-core 0.16's fully_reshardable format load into torch's Adam (no Apex/TE).

    Its loader leaves `step` out of the tensors it hands to _set_main_param_and_optimizer_states
    (the step is in the param groups), which copies every key of the live Adam state, `step`
    included: KeyError. For the duration of the load, complete those tensors with the live step
    (a copy onto itself); _restore_adam_steps then sets its value."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not (isinstance(opt, DistributedOptimizer)
                and isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW))):
            continue  # Apex/TE Adam keeps no per-parameter step

        def set_states(model_param, tensors, _opt=opt,
                       _set=opt._set_main_param_and_optimizer_states):
            if "step" not in tensors:
                live = _opt._get_main_param_and_optimizer_states(model_param)
                if "step" in live:
                    tensors = {**tensors, "step": live["step"]}
            _set(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states  # instance attribute: this load only
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter of a DistributedOptimizer its own Adam `step` holding the saved value.

    Without Apex/TE, megatron-core 0.16's DistributedOptimizer saves torch Adam's per-parameter
    step as one number in its param groups and restores it wrongly, twice over:
      - load_state_dict puts one shared tensor holding the saved step into every parameter's
        state; torch's Adam would then increment it once per parameter and step;
      - the dp_reshardable parameter-state load that follows copies into that tensor the `step`
        of the loading template, i.e. the value it held before the checkpoint was read (0 for a
        fresh optimizer).
    The first resumed step therefore computes the loss from the right weights but updates them
    with the bias correction of step 1, and every later step diverges. The saved step survives in
    the inner optimizer's param groups (torch's load_state_dict keeps the saved groups' keys), so
    take it from there. With Apex/TE, Adam keeps its step in the param groups only: no-op."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue  # torch's own load_state_dict restores a per-parameter step exactly
        inner = opt.optimizer
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state is not None and isinstance(state.get("step"), torch.Tensor):
                    old = state["step"]
                    state["step"] = torch.tensor(float(group["step"]), dtype=old.dtype,
                                                 device=old.device)
