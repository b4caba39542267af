"""Save and resume with megatron-core dist_checkpointing: complete and atomic.

A checkpoint holds the model, the optimizer (FP32 main parameters and Adam moments, sharded the
way the optimizer is), the LR scheduler, every RNG stream of every rank (rng_state.py), the data
position (consumed samples; data order is a function of the seed) and the full configuration.
Directory layout and atomic commit: checkpoint_dirs.py. Each checkpoint carries a manifest of its
files, verified before loading; a damaged one is named with the way out, and a failed write
leaves no partial directory and the previous checkpoint latest (checkpoint_integrity.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_averis.training import checkpoint_dirs, preflight, rng_state
from megatron_averis.training import checkpoint_integrity as integrity
from megatron_averis.training.checkpoint_integrity import CheckpointDamaged, CheckpointWriteFailed
from megatron_averis.training.config import TrainingConfig
from megatron_averis.training.optim import chained, is_torch_adam, torch_adams

# What megatron-core's reader and writer raise; torch's CheckpointException is no Exception.
_IO_ERRORS = (Exception, CheckpointException)
# Architecture fields that must match for a checkpoint's weights to load into this model.
_ARCH_MUST_MATCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "kv_channels", "qk_layernorm", "tie_embeddings")
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint version


def _layout() -> list[int]:
    return [parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size()]


def _rank_coords() -> tuple[int, int, int]:
    return (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank())


def megatron_lm_args(cfg: TrainingConfig, train_state: dict) -> argparse.Namespace:
    """The `args` entry of a Megatron-LM checkpoint: the run's flags under Megatron-LM's names,
    with the architecture resolved (Megatron-LM's load reads num_layers, hidden_size,
    num_attention_heads, consumed_train_samples, ...)."""
    flags = {k: v for k, v in cfg.flags.items() if not isinstance(v, dict)}
    a = cfg.model.arch
    flags.update(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, group_query_attention=True,
        num_query_groups=a.num_query_groups, kv_channels=a.kv_channels,
        qk_layernorm=a.qk_layernorm, rotary_base=a.rotary_base, norm_epsilon=a.norm_epsilon,
        max_position_embeddings=a.max_position_embeddings, init_method_std=a.init_method_std,
        untie_embeddings_and_output_weights=not a.tie_embeddings,
        attention_dropout=a.attention_dropout, hidden_dropout=a.hidden_dropout,
        position_embedding_type="rope", add_position_embedding=True, normalization="RMSNorm",
        swiglu=True, add_bias_linear=False, padded_vocab_size=cfg.model.padded_vocab_size,
        ckpt_format="torch_dist", use_dist_ckpt=True, iteration=train_state["iteration"],
        consumed_train_samples=train_state["consumed_train_samples"],
        consumed_valid_samples=0, skipped_train_samples=0)
    return argparse.Namespace(**flags)


def arch_of_megatron_lm_args(ckpt_args) -> dict:
    """_ARCH_MUST_MATCH fields of a Megatron-LM checkpoint's `args` (its defaults applied)."""
    get = lambda k, d=None: getattr(ckpt_args, k, d)  # noqa: E731
    heads = get("num_attention_heads")
    groups = get("num_query_groups") if get("group_query_attention") else None
    return {"num_layers": get("num_layers"), "hidden_size": get("hidden_size"),
            "ffn_hidden_size": get("ffn_hidden_size"), "num_attention_heads": heads,
            "num_query_groups": groups or heads,
            "kv_channels": get("kv_channels") or (get("hidden_size") // heads if heads else None),
            "qk_layernorm": bool(get("qk_layernorm", False)),
            "tie_embeddings": not get("untie_embeddings_and_output_weights", False)}


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
    """Saves and loads the whole training state of this process's model chunks, in Megatron-LM's
    layout; loads Megatron-LM's checkpoints of the same architecture."""

    def __init__(self, cfg: TrainingConfig, model_chunks, optimizer, scheduler, config_dict: dict):
        self.cfg = cfg
        self.model = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config_dict = config_dict

    def _metadata(self, saved: dict | None = None) -> dict:
        """The sharded-state-dict metadata Megatron-LM uses (saved as the content metadata, so a
        load reads a checkpoint the way it was written)."""
        metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
        if self.cfg.parallel.use_distributed_optimizer:
            metadata["distrib_optim_sharding_type"] = (
                "fully_reshardable" if self.cfg.checkpoint.dist_ckpt_optim_fully_reshardable
                else "dp_reshardable")
        metadata.update(saved or {})
        return metadata

    def _sharded_state_dict(self, metadata: dict, *, rng: bool) -> dict:
        """The sharded part, keyed as Megatron-LM keys it ("model", "optimizer"); the RNG state
        is ours (Megatron-LM's own `rng_state` has another format)."""
        live = self._live(metadata)
        # The models' own keys, without the DDP wrapper's "module." prefix.
        if len(self.model) == 1:
            state = {"model": self.model[0].module.sharded_state_dict(metadata=live)}
        else:
            state = {f"model{i}": m.module.sharded_state_dict(metadata=live)
                     for i, m in enumerate(self.model)}
        if rng:
            # One object per rank: TP ranks differ in their tracker streams, DP ranks may differ
            # in Python/NumPy state and stochastic-rounding counters do not, but keeping every
            # rank's own state makes the resume exact without reasoning about which are equal.
            state["averis_rng_state"] = ShardedObject(
                "averis_rng_state", rng_state.capture(self.model), tuple(_layout()),
                _rank_coords(), replica_id=0)
        return state

    def save(self, iteration: int, train_state: dict) -> tuple[str, float]:
        """Write a checkpoint of `iteration`; returns (directory, seconds). Collective."""
        start = time.monotonic()
        root = self.cfg.checkpoint.save
        temp = checkpoint_dirs.temp_dir(root, iteration)
        try:
            _everywhere(lambda: checkpoint_dirs.prepare_temp_dir(root, iteration), rank0_only=True)
            metadata = self._metadata()
            state = self._sharded_state_dict(metadata, rng=True)
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state, is_loading=False, metadata=self._live(metadata))
            state.update({
                "args": megatron_lm_args(self.cfg, train_state),
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "opt_param_scheduler": self.scheduler.state_dict(),
                "num_floating_point_operations_so_far": train_state.get(
                    "floating_point_operations", 0),
                "train_state": dict(train_state),
                "config": self.config_dict,
                "parallel_layout": _layout(),
            })
            # Replicated tensors are written by one data-parallel rank each, spread over the group.
            strategy = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(),
                parallel_state.get_data_parallel_group(with_context_parallel=True))
            dist_checkpointing.save(state, temp, sharded_strategy=strategy,
                                    content_metadata=metadata)
            final = self._seal(temp, iteration)
        except _IO_ERRORS as e:
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(temp, ignore_errors=True)
            model = self.cfg.model
            need = preflight.checkpoint_bytes(model.arch, model.padded_vocab_size, model.bf16)
            raise CheckpointWriteFailed(integrity.write_failure_message(
                e, temp, root, need, latest_checkpoint(root))) from e
        return final, time.monotonic() - start

    def _seal(self, temp: str, iteration: int) -> str:
        """Every rank's files are written: record them in the manifest (each rank hashes a share)
        and commit. Returns the final directory."""
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        files = _everywhere(lambda: integrity.list_files(temp), rank0_only=True)[0]
        parts = _everywhere(lambda: integrity.describe_files(
            temp, integrity.share(files, rank, world), self.cfg.checkpoint.ckpt_integrity))
        entries = {k: v for part in parts for k, v in part.items()}

        def commit():
            integrity.write_manifest(temp, entries, self.cfg.checkpoint.ckpt_integrity)
            return checkpoint_dirs.commit(self.cfg.checkpoint.save, iteration)

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
        if previous is not None and self.cfg.checkpoint.ckpt_fallback:
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

    def _find_intact(self) -> tuple[int | None, str] | None:
        """The checkpoint --load / --ckpt-step name, verified against its manifest; None when
        there is none yet. Iteration None: --load is a checkpoint directory itself."""
        load = self.cfg.checkpoint.load
        direct = checkpoint_dirs.is_checkpoint_dir(load)
        root = os.path.dirname(os.path.abspath(load)) if direct else load
        try:
            found = checkpoint_dirs.find_checkpoint(load, self.cfg.checkpoint.ckpt_step)
        except checkpoint_dirs.TrackerDamaged as e:
            return self._way_out(root, None, os.path.join(root, checkpoint_dirs.TRACKER), str(e))
        if found is None:
            return None
        problems = self._problems(found[1])
        if problems:
            # A directory given itself falls back only to older siblings named iter_N.
            below = found[0] if not direct else (checkpoint_dirs.iteration_of(load) or 0)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return self._way_out(root, below, found[1], problems[0] + more)
        if problems is None and torch.distributed.get_rank() == 0:
            print(f"note: {found[1]} has no {integrity.MANIFEST} (written by Megatron-LM or an "
                  "older version of this program); loading it unverified", flush=True)
        return found

    @staticmethod
    def _live(metadata: dict) -> dict:
        return {**metadata, "dp_cp_group": parallel_state.get_data_parallel_group(
            with_context_parallel=True)}

    def load(self) -> dict | None:
        """Restore from --load; returns the train state to continue from, or None when --load
        holds no checkpoint yet (a fresh start). A Megatron-LM checkpoint gives its weights, and
        its optimizer and schedule when it has them; without optimizer state (or with
        --finetune) training starts at iteration 0 from its weights. Collective."""
        found = self._find_intact()
        if found is None:
            return None
        iteration, path = found
        with _named_on_failure(path):
            common = dist_checkpointing.load_common_state_dict(path)
            saved_metadata = dist_checkpointing.load_content_metadata(path) or {}
            has_optim = any(k.startswith("optimizer") for k in load_sharded_metadata(path))
        ours = "config" in common
        if iteration is None:
            iteration = int(common.get("iteration", 0))
        self._check_compatible(common, path, ours)
        metadata = self._metadata({k: v for k, v in saved_metadata.items()
                                   if k != "distrib_optim_sharding_type"
                                   or self.cfg.parallel.use_distributed_optimizer})
        finetune = self.cfg.checkpoint.finetune or not has_optim
        load_optim = has_optim and not (self.cfg.checkpoint.no_load_optim or finetune)
        load_rng = (ours and not (self.cfg.checkpoint.no_load_rng or finetune)
                    and common["parallel_layout"] == _layout())
        state = self._sharded_state_dict(metadata, rng=load_rng)
        if load_optim:
            _materialize_optimizer_state(self.optimizer)
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state, is_loading=True, metadata=self._live(metadata))
        try:
            loaded = dist_checkpointing.load(state, path)
        except _IO_ERRORS as e:
            if ours or not load_optim:
                raise _unreadable(path, e) from e
            # Megatron-LM's optimizer state follows its optimizer (TE/Apex Adam, sharding type).
            raise ValueError(f"{path}: the weights of this Megatron-LM checkpoint fit, but its "
                             f"optimizer state does not load here ({type(e).__name__}: {e}); "
                             "start from its weights with --finetune (or --no-load-optim to keep "
                             "its iteration and schedule)") from e
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
        elif self.optimizer is not None:
            # Without optimizer state the FP32 main parameters still hold the initial weights:
            # copy the loaded ones in (megatron-core's mixed-precision optimizer keeps its own).
            self.optimizer.reload_model_params()
        if not finetune and "opt_param_scheduler" in common:
            self.scheduler.load_state_dict(common["opt_param_scheduler"])
        if load_rng:
            rng_state.restore(loaded["averis_rng_state"], self.model)
        if finetune:
            train_state = {"iteration": 0, "consumed_train_samples": 0}
        elif ours:
            train_state = dict(common["train_state"])
        else:
            train_state = {"iteration": iteration, "consumed_train_samples": int(getattr(
                common.get("args"), "consumed_train_samples", 0))}
        train_state.update(loaded_from=path, loaded_iteration=iteration, rng_restored=load_rng,
                           optimizer_restored=load_optim, finetune=finetune,
                           source="megatron-averis" if ours else "Megatron-LM")
        return train_state

    def _check_compatible(self, common: dict, path: str, ours: bool) -> None:
        if ours:
            saved = {**common["config"]["arch"], "padded_vocab_size": common["config"].get(
                "padded_vocab_size")}
        elif "args" in common:
            saved = {**arch_of_megatron_lm_args(common["args"]),
                     "padded_vocab_size": getattr(common["args"], "padded_vocab_size", None)}
        else:
            raise checkpoint_dirs.UnrecognisedCheckpoint(
                f"{path} is a dist checkpoint without Megatron-LM's `args` or this program's run "
                "configuration; it was not written by Megatron-LM's or this trainer")
        model = self.cfg.model
        now = {**model.arch.as_dict(), "padded_vocab_size": model.padded_vocab_size}
        keys = _ARCH_MUST_MATCH + (("padded_vocab_size",) if saved["padded_vocab_size"] else ())
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
                 for k in keys if saved.get(k) != now.get(k)]
        if diffs:
            raise ValueError(f"checkpoint {path} was trained with a different model; "
                             "use the same architecture flags (or --model-preset) and tokenizer "
                             "(--make-vocab-size-divisible-by pads the vocabulary):\n  "
                             + "\n  ".join(diffs))


def _unreadable(path: str, error: BaseException) -> CheckpointDamaged:
    """megatron-core's reader fails on a damaged file (here: one without a manifest) with a
    traceback that names neither the checkpoint nor a way out."""
    root = os.path.dirname(os.path.abspath(path))
    others = [str(it) for it, p in checkpoint_dirs.committed_checkpoints(root) if p != path]
    return CheckpointDamaged(path, f"it cannot be read ({integrity.error_summary(error)}). Resume "
                             "another checkpoint with --ckpt-step N; complete ones under "
                             f"{root}: {', '.join(others) or 'none'}")


@contextlib.contextmanager
def _named_on_failure(path: str):
    try:
        yield
    except _IO_ERRORS as e:
        raise _unreadable(path, e) from e


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors before building the loading template.

    megatron-core's DistributedOptimizer describes its state from the inner optimizer's state
    (without Apex/TE it even reads the Adam step from it), which a torch optimizer creates only
    in its first step. Create Adam's state as that step would (step 0, zero moments) without
    touching any parameter; the checkpoint then overwrites the moments and main parameters, and
    _restore_adam_steps the step."""
    for inner in torch_adams(optimizer):  # the trainer builds Adam; others have other state
        if len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")  # else torch keeps it on CPU
            for p in group["params"]:
                inner.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32,
                                         device=p.device if on_device else "cpu"),
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
    for opt in chained(optimizer):
        if not (isinstance(opt, DistributedOptimizer) and is_torch_adam(opt.optimizer)):
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
    for opt in chained(optimizer):
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
