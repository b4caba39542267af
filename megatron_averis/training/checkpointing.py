"""Save and resume with megatron-core dist_checkpointing: complete and atomic.

A checkpoint holds the model, the optimizer (FP32 main parameters and Adam moments, sharded the
way the optimizer is), the LR scheduler, every RNG stream of every rank (rng_state.py), the data
position (consumed samples; data order is a function of the seed) and the full configuration.
Directory layout and atomic commit: checkpoint_dirs.py. Each checkpoint carries a manifest of its
files, verified before loading; a damaged one is named with the way out, and a failed write
leaves no partial directory and the previous checkpoint latest (checkpoint_integrity.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_averis.training import checkpoint_dirs, preflight, rng_state
from megatron_averis.training import checkpoint_integrity as integrity
from megatron_averis.training.checkpoint_integrity import (CheckpointDamaged, CheckpointError,
                                                           CheckpointWriteFailed)

# What megatron-core's reader and writer raise; torch's CheckpointException is no Exception.
_IO_ERRORS = (Exception, CheckpointException)
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


class _FailedElsewhere(RuntimeError):
    """A step of a collective operation raised on another rank (its error as text)."""


def _everywhere(fn, *, rank0_only: bool = False) -> list:
    """fn() on every rank (or rank 0 only); every rank's result. When it raises on any rank, every
    rank raises, so none is left waiting in the next collective."""
    result, error = None, None
    if not rank0_only or torch.distributed.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(
        gathered, (result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failures = [text for _, text in gathered if text]
    if failures:
        raise _FailedElsewhere(failures[0])
    return [r for r, _ in gathered]


def latest_checkpoint(root: str) -> tuple[int, str] | None:
    """(iteration, directory) the tracker names, or None (none, or the tracker is unreadable)."""
    try:
        return checkpoint_dirs.find_latest_checkpoint(root)
    except (OSError, ValueError, KeyError):
        return None


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
        temp = checkpoint_dirs.temp_dir(root, iteration)
        try:
            _everywhere(lambda: checkpoint_dirs.prepare_temp_dir(root, iteration), rank0_only=True)
            state = self._sharded_state_dict(is_loading=False, optimizer=True, rng=True,
                                             train_state=train_state)
            # Replicated tensors are written by one data-parallel rank each, spread over the group.
            strategy = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(),
                parallel_state.get_data_parallel_group(with_context_parallel=True))
            dist_checkpointing.save(state, temp, sharded_strategy=strategy)
            final = self._seal(temp, iteration, train_state)
        except _IO_ERRORS as e:
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(temp, ignore_errors=True)
            need = preflight.checkpoint_bytes(self.args.arch, self.args.padded_vocab_size,
                                              self.args.bf16)
            raise CheckpointWriteFailed(integrity.write_failure_message(
                e, temp, root, need, latest_checkpoint(root))) from e
        return final, time.monotonic() - start

    def _seal(self, temp: str, iteration: int, train_state: dict) -> str:
        """Every rank's files are written: record them in the manifest (each rank hashes a share)
        and commit. Returns the final directory."""
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        files = _everywhere(lambda: integrity.list_files(temp), rank0_only=True)[0]
        parts = _everywhere(lambda: integrity.describe_files(
            temp, integrity.share(files, rank, world), self.args.ckpt_integrity))
        entries = {k: v for part in parts for k, v in part.items()}

        def commit():
            integrity.write_manifest(temp, entries, self.args.ckpt_integrity, train_state)
            return checkpoint_dirs.commit(self.args.save, iteration, train_state)

        return _everywhere(commit, rank0_only=True)[0]

    def _problems(self, path: str) -> list[str] | None:
        """Verify a checkpoint against its manifest, each rank a share; None without a manifest."""
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        parts = _everywhere(lambda: integrity.check(path, rank, world))
        return None if parts[0] is None else [p for part in parts for p in part]

    def _way_out(self, root: str, below: int | None, damaged: str, problem: str) -> tuple[int, str]:
        """The newest intact checkpoint under `root` older than `below` (any when None): returned
        under --ckpt-fallback, else named in the error. Collective."""
        previous = None
        for iteration, path in reversed(checkpoint_dirs.committed_checkpoints(root)):
            if (below is None or iteration < below) and not self._problems(path):
                previous = (iteration, path)
                break
        if previous is not None and self.args.ckpt_fallback:
            if torch.distributed.get_rank() == 0:
                print(f"warning: checkpoint {damaged} is damaged: {problem}; loading iteration "
                      f"{previous[0]} ({previous[1]}) instead (--ckpt-fallback)", flush=True)
            return previous
        earlier = "" if below is None else "earlier "
        if previous is not None:
            way = (f"The newest intact {earlier}checkpoint is iteration {previous[0]} "
                   f"({previous[1]}): resume it with --ckpt-step {previous[0]}, or add "
                   "--ckpt-fallback to fall back automatically")
        else:
            way = (f"There is no intact {earlier}checkpoint under {root}: start afresh with an "
                   "empty --save directory")
        raise CheckpointDamaged(damaged, f"{problem}. {way}")

    def _find_intact(self) -> tuple[int, str] | None:
        """The checkpoint --load / --ckpt-step name, verified; None when there is none yet."""
        load = self.args.load
        root = os.path.dirname(os.path.abspath(load)) if checkpoint_dirs.is_checkpoint_dir(load) else load
        try:
            found = checkpoint_dirs.find_checkpoint(load, self.args.ckpt_step)
        except (OSError, ValueError, KeyError) as e:  # the tracker is unreadable or names junk
            return self._way_out(root, None, os.path.join(root, checkpoint_dirs.TRACKER),
                                 f"{type(e).__name__}: {e}")
        if found is None:
            return None
        problems = self._problems(found[1])
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return self._way_out(root, found[0], found[1], problems[0] + more)
        if problems is None and torch.distributed.get_rank() == 0:
            print(f"note: {found[1]} has no {integrity.MANIFEST} (written by an older version); "
                  "loading it unverified", flush=True)
        return found

    def load(self) -> dict | None:
        """Restore everything from --load; returns the saved train state, or None when --load
        holds no checkpoint yet (a fresh start). Collective."""
        found = self._find_intact()
        if found is None:
            return None
        iteration, path = found
        with _named_on_failure(path):
            common = dist_checkpointing.load_common_state_dict(path)
        self._check_compatible(common["config"], path)
        load_rng = not self.args.no_load_rng and common["parallel_layout"] == _layout()
        load_optim = not self.args.no_load_optim
        if load_optim:
            _materialize_optimizer_state(self.optimizer)
        state = self._sharded_state_dict(is_loading=True, optimizer=load_optim, rng=load_rng)
        with _named_on_failure(path):
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


@contextlib.contextmanager
def _named_on_failure(path: str):
    """megatron-core's reader fails on a damaged file (here: one without a manifest) with a
    traceback that names neither the checkpoint nor a way out."""
    try:
        yield
    except CheckpointError:
        raise
    except _IO_ERRORS as e:
        root = os.path.dirname(os.path.abspath(path))
        others = [str(it) for it, p in checkpoint_dirs.committed_checkpoints(root) if p != path]
        raise CheckpointDamaged(path, f"it cannot be read ({integrity.error_summary(e)}). Resume "
                                "another checkpoint with --ckpt-step N; complete ones under "
                                f"{root}: {', '.join(others) or 'none'}") from e


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
