"""The pretraining program: set-up, the training loop, validation and checkpoints.

One iteration = one global batch: megatron-core's forward-backward schedule (no pipelining, or
1F1B across pipeline stages) runs the micro-batches, finalize_model_grads reduces gradients
across data-parallel ranks and scales them by 1 / (tokens in the global batch), the optimizer
clips the global gradient norm and steps, and the LR schedule advances by one global batch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_averis.linear.sr_step import SR_STEP
from megatron_averis.training import data as data_lib
from megatron_averis.training import distributed, preflight
from megatron_averis.training.arguments import ConfigError, finalize_args, parse_args
from megatron_averis.training.checkpoint_integrity import CheckpointError
from megatron_averis.training.checkpointing import Checkpointer, latest_checkpoint
from megatron_averis.training.config import TrainingConfig
from megatron_averis.training.cpu_compat import cpu_training
from megatron_averis.training import cuda_graph
from megatron_averis.training.divergence import DivergenceGuard, TrainingDiverged, guarded_step
from megatron_averis.training.metrics import (format_duration, interval_stats, memory_gib,
                                              peak_tflops, progress_line)
from megatron_averis.training.model import build_model, count_local_parameters, transformer_config
from megatron_averis.training.optim import build_optimizer, build_scheduler, wrap_data_parallel
from megatron_averis.training.presets import parameter_counts, training_flops_per_iteration
from megatron_averis.training.rng_state import seed_everything
from megatron_averis.training.writers import RunLogger, new_launch_id, wandb_run_id


def print0(*parts) -> None:
    if torch.distributed.get_rank() == 0:
        print(*parts, flush=True)


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def _git(*argv: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", *argv], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """The code a run used: HEAD's commit and whether tracked files differ from it (a run made
    from uncommitted changes is not reproducible from the commit alone); None outside git."""
    commit = _git("rev-parse", "HEAD") or None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def run_config(cfg: TrainingConfig, tokenizer) -> dict:
    """Everything that defines the run, identical on every rank (it goes into checkpoints)."""
    import megatron.core

    out = dict(cfg.flags)
    out["tokenizer"] = {"vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
    out["world_size"] = torch.distributed.get_world_size()
    out["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "megatron_core": megatron.core.__version__}
    out.update(git_state())
    return json.loads(json.dumps(out, default=str))


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of token losses and the token count; the schedule divides by the global count."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    total = torch.sum(losses * mask)
    count = mask.sum()
    return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count.detach()])}


class Trainer:
    """Built from the run's TrainingConfig (self.cfg; self.config is megatron-core's
    TransformerConfig) and the tokenizer main() loaded."""

    def __init__(self, cfg: TrainingConfig, tokenizer, env, device: torch.device):
        self.cfg, self.tokenizer, self.env, self.device = cfg, tokenizer, env, device
        self.world = torch.distributed.get_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        seed_everything(cfg.execution.seed, parallel_state.get_pipeline_model_parallel_rank())

        self._build_model_and_optimizer()
        self.config_dict = run_config(cfg, self.tokenizer)
        self.checkpointer = Checkpointer(cfg, self.model, self.optimizer, self.scheduler,
                                         self.config_dict)
        self._build_schedules()
        self.guard = DivergenceGuard(cfg.fault_tolerance)

        self.iteration = 0
        self.consumed_samples = 0
        self.resumed_from = None
        if cfg.checkpoint.load:
            start = time.monotonic()
            state = self.checkpointer.load()
            if state is not None:
                self.iteration = state["iteration"]
                self.consumed_samples = state["consumed_train_samples"]
                self.resumed_from = {**state, "seconds": round(time.monotonic() - start, 1)}
                self.guard.load_state_dict(state.get("divergence_guard"))

        start = time.monotonic()
        print0("building datasets (megatron-core indexes a corpus once and caches the index)...")
        self.train_ds, self.valid_ds, self.test_ds = data_lib.build_datasets(cfg, self.tokenizer)
        print0(f"datasets ready in {time.monotonic() - start:.1f} s: train {len(self.train_ds):,} "
               f"samples" + (f", valid {len(self.valid_ds):,}" if self.valid_ds is not None else "")
               + (f", test {len(self.test_ds):,}" if self.test_ds is not None else ""))
        self.logger = RunLogger(cfg.logging, self.config_dict,
                                enabled=torch.distributed.get_rank() == 0, wandb_id=self._wandb_id())
        batch = cfg.batch
        self.tokens_per_iteration = batch.global_batch_size * batch.seq_length
        self.flops_per_iteration = training_flops_per_iteration(
            cfg.model.arch, cfg.model.padded_vocab_size, batch.seq_length, batch.global_batch_size)
        self.peak, self.peak_text = peak_tflops(device, cfg.logging.peak_tflops)
        self.stop_requested = self.signalled = False
        self.launched = time.monotonic()
        if cfg.checkpoint.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self._report_setup()

    def _wandb_id(self) -> str:
        """The resumed run's wandb id (kept in its checkpoints), else a new launch's, the same on
        every rank."""
        r = self.resumed_from
        if r and not r["finetune"] and r.get("wandb_run_id"):
            return r["wandb_run_id"]
        chosen = [wandb_run_id(self.cfg.logging.run_name, new_launch_id())]
        torch.distributed.broadcast_object_list(chosen, src=0)
        return chosen[0]

    def _build_model_and_optimizer(self) -> None:
        """Model chunks wrapped in DDP, the optimizer and the LR schedule, from self.cfg on
        self.device. Also how benchmarks/model_step.py builds them."""
        cfg, device = self.cfg, self.device
        self.config = transformer_config(cfg.model, device)
        model = build_model(cfg.model, self.config, device)
        self.local_parameters = count_local_parameters(model)
        self.model = wrap_data_parallel(cfg, self.config, model)
        self.optimizer = build_optimizer(cfg, self.config, self.model)
        self.scheduler = build_scheduler(cfg.optimizer, cfg.schedule, self.optimizer)

    def _build_schedules(self) -> None:
        """megatron-core's forward-backward schedule; for training, captured in a CUDA graph under
        --cuda-graph-impl local (validation stays eager)."""
        self.forward_backward = get_forward_backward_func()
        self._train_schedule = partial(self._schedule, forward_only=False)
        if self.cfg.execution.cuda_graph:
            self._train_schedule = cuda_graph.IterationGraph(
                self._train_schedule, self.cfg.batch.num_microbatches,
                self.cfg.execution.cuda_graph_warmup_steps, self.device)

    # -- set-up report ------------------------------------------------------------------
    def _report_setup(self) -> None:
        cfg = self.cfg
        model, batch, data, adam, schedule = cfg.model, cfg.batch, cfg.data, cfg.optimizer, cfg.schedule
        log, load = cfg.logging, cfg.checkpoint.load
        counts = parameter_counts(model.arch, model.padded_vocab_size)
        steps = schedule.lr_schedule_samples
        device = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU")
        tied = "tied with the output layer" if model.arch.tie_embeddings else \
            f"+ output layer {_millions(counts['output_layer'])}"
        lines = [
            f"megatron-averis pretrain: run {log.run_name!r} | world {self.world} = TP "
            f"{model.tensor_model_parallel_size} x PP {model.pipeline_model_parallel_size} x DP "
            f"{self.dp_size}{' + SP' if model.sequence_parallel else ''} | {self.device.type} "
            f"({device}), {torch.distributed.get_backend()}",
            f"model {log.model_preset or 'custom'}: {_millions(counts['total'])} parameters "
            f"(embedding {_millions(counts['embedding'])} {tied}, decoder "
            f"{_millions(counts['decoder'])}); this rank holds {_millions(self.local_parameters)}",
            f"vocabulary {data.tokenizer_vocab_size} from {data.tokenizer_type} "
            f"{data.tokenizer_model or ''}, padded to {model.padded_vocab_size}",
            f"precision: {'BF16' if model.bf16 else 'FP32'} parameters, FP32 main grads"
            f"{', distributed optimizer' if cfg.parallel.use_distributed_optimizer else ''}",
            model.recipe.describe() if not model.recipe.is_bf16 else
            f"recipe {model.recipe.name}: no quantized GEMMs ({'BF16' if model.bf16 else 'FP32'})",
            f"batch: global {batch.global_batch_size} = micro {batch.micro_batch_size} x "
            f"{batch.num_microbatches} micro-batches x DP {self.dp_size}; seq {batch.seq_length}; "
            f"{self.tokens_per_iteration:,} tokens/step; "
            f"{batch.train_iters * self.tokens_per_iteration:,} tokens in {batch.train_iters} steps",
            f"lr: {schedule.lr_decay_style} {adam.lr:g} -> {adam.min_lr:g} over "
            f"{steps['decay']:,} samples, warm-up {steps['warmup']:,} samples from "
            f"{schedule.lr_warmup_init:g}"
            + (f", WSD decay {steps['wsd']:,} samples ({schedule.lr_wsd_decay_style})"
               if schedule.lr_decay_style == "WSD" else "")
            + f"; clip-grad {adam.clip_grad:g}; seed {cfg.execution.seed}",
            f"model FLOPs: {self.flops_per_iteration / 1e12:,.2f} TFLOP per step; MFU against "
            f"{self.peak_text}",
            f"logs: {log.log_dir} (metrics.jsonl, config.json), TensorBoard {log.tensorboard_dir}",
        ]
        lines += self.logger.messages
        lines += cfg.execution.execution_notes
        lines += log.ignored_flags
        if self.resumed_from:
            r = self.resumed_from
            if r["finetune"]:
                lines.append(f"weights of {r['source']} checkpoint {r['loaded_from']} (iteration "
                             f"{r['loaded_iteration']}); training starts at iteration 0 "
                             "(--finetune, or no optimizer state in the checkpoint)")
            else:
                lines.append(f"resumed from {r['loaded_from']} ({r['source']}) at iteration "
                             f"{r['iteration']} ({r['consumed_train_samples']:,} samples consumed; "
                             f"loaded in {r['seconds']} s)"
                             + ("" if r["rng_restored"] else "; RNG state not restored")
                             + ("" if r["optimizer_restored"] else "; optimizer state not restored"))
        elif load:
            lines.append(f"--load {load}: no checkpoint yet, starting from scratch")
        print0("\n".join(lines))
        if torch.distributed.get_rank() == 0:
            start = {**self.config_dict, "launch_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "resumed_from": self.resumed_from, "parameters": counts,
                     "rank0_local_parameters": self.local_parameters,
                     "flops_per_iteration": self.flops_per_iteration, "mfu_peak": self.peak_text}
            with open(os.path.join(log.log_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(start, f, indent=2, sort_keys=True)
            self.logger.record("start", self.iteration, {"config": start})

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = self.signalled = True

    # -- one step -----------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        position_ids = batch["position_ids"].to(self.device, non_blocking=True)
        output = model(tokens, position_ids, None, labels=labels)
        return output, partial(_loss_func, loss_mask)

    def _reduce_losses(self, losses_reduced) -> torch.Tensor:
        """[sum of token losses, tokens] over the global batch, identical on every rank."""
        total = torch.zeros(2, dtype=torch.float32, device=self.device)
        for item in losses_reduced:  # empty except on the last pipeline stage
            total += item["lm loss"].float()
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total

    def _schedule(self, data_iterator, forward_only: bool):
        batch = self.cfg.batch
        return self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=batch.num_microbatches,
            seq_length=batch.seq_length,
            micro_batch_size=batch.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, data_iterator):
        SR_STEP.begin_step(self.iteration)  # stochastic rounding keyed by the step (linear.sr_step)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._train_schedule(data_iterator)
        lr = self.optimizer.param_groups[0]["lr"]
        total = self._reduce_losses(losses)
        loss = (total[0] / total[1]).item()
        updated, grad_norm, diverged = guarded_step(
            self.optimizer, lambda norm: self.guard.assess(loss, norm))
        if updated:
            self.scheduler.step(increment=self.cfg.batch.global_batch_size)
            self.guard.healthy(loss, grad_norm)
        return total, grad_norm, lr, updated, diverged

    # -- validation ---------------------------------------------------------------------
    def evaluate(self, dataset) -> float:
        cfg = self.cfg
        for chunk in self.model:
            chunk.eval()
        loader = data_lib.make_loader(dataset, 0, data_lib.eval_samples(cfg), cfg, self.dp_rank,
                                      self.dp_size, pin_memory=self.device.type == "cuda",
                                      persistent=False)
        iterator = iter(loader)
        total = torch.zeros(2, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for _ in range(cfg.data.eval_iters):
                total += self._reduce_losses(self._schedule(iterator, forward_only=True))
        for chunk in self.model:
            chunk.train()
        return (total[0] / total[1]).item()

    def _validate(self, split: str, dataset) -> float:
        start = time.monotonic()
        loss = self.evaluate(dataset)
        seconds = time.monotonic() - start
        ppl = float(torch.tensor(loss).exp()) if loss < 50 else float("inf")
        print0(f"{split} loss at step {self.iteration}: {loss:.4f} | ppl {ppl:.2f} | "
               f"{data_lib.eval_samples(self.cfg) * self.cfg.batch.seq_length:,} tokens in "
               f"{seconds:.1f} s")
        self.logger.record(split, self.iteration, {"loss": loss, "ppl": ppl, "seconds": seconds},
                           scalars={f"{split}/loss": loss, f"{split}/ppl": ppl})
        if split == "valid":
            self.last_validated = self.iteration
        return seconds

    def _save(self) -> float:
        train_state = {
            "iteration": self.iteration,
            "consumed_train_samples": self.consumed_samples,
            "consumed_train_tokens": self.consumed_samples * self.cfg.batch.seq_length,
            "seed": self.cfg.execution.seed,
            "global_batch_size": self.cfg.batch.global_batch_size,
            "floating_point_operations": self.iteration * self.flops_per_iteration,
            "wandb_run_id": self.logger.wandb_id,
            "divergence_guard": self.guard.state_dict(),
        }
        path, seconds = self.checkpointer.save(self.iteration, train_state)
        print0(f"saved checkpoint of step {self.iteration} to {path} in {seconds:.1f} s")
        self.logger.record("checkpoint", self.iteration, {"path": path, "seconds": seconds})
        self.last_saved = self.iteration
        return seconds

    def _diverged(self, total: torch.Tensor, grad_norm, reasons: list[str]) -> None:
        """Log a diverged step (self.iteration is its number) and abort when the policy says so."""
        abort = self.guard.must_abort()
        healthy = self.iteration - self.guard.skipped_in_a_row  # skipped steps changed nothing
        self.logger.record("divergence", self.iteration, {
            "loss": (total[0] / total[1]).item(), "grad_norm": grad_norm, "reasons": reasons,
            "action": "abort" if abort else "skip", "last_healthy_step": healthy,
            "skipped_in_a_row": self.guard.skipped_in_a_row, "consumed_samples": self.consumed_samples})
        print0(f"divergence at step {self.iteration}: {'; '.join(reasons)}; "
               + ("stopping" if abort else "its update is skipped"))
        if not abort:
            return
        save = self.cfg.checkpoint.save
        found = latest_checkpoint(save) if save else None
        skipping = self.guard.action == "skip"
        raise TrainingDiverged(
            f"training diverged at step {self.iteration} ({'; '.join(reasons)})"
            + (f", {self.guard.skipped_in_a_row} diverged steps in a row (--max-skipped-steps "
               f"{self.guard.max_skips})" if skipping else "")
            + (f". The weights are those of step {healthy}, the last healthy one (diverged "
               "updates were skipped); " if skipping else
               f". Nothing was saved after step {healthy}, the last healthy one; ")
            + (f"the latest checkpoint is iteration {found[0]} ({found[1]})" if found
               else "there is no checkpoint")
            + ". Resume with a lower --lr (--load, --ckpt-step)"
            + ("" if skipping else ", or pass --divergence-action skip to drop diverged steps")
            + " (docs/training.md, 'When things go wrong')")

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # -- the loop -----------------------------------------------------------------------
    def train(self) -> None:
        cfg, batch, ckpt = self.cfg, self.cfg.batch, self.cfg.checkpoint
        self.last_saved = (self.iteration if self.resumed_from and not self.resumed_from["finetune"]
                           else None)
        self.last_validated = None
        loader = data_lib.make_loader(self.train_ds, self.consumed_samples,
                                      batch.train_iters * batch.global_batch_size, cfg, self.dp_rank,
                                      self.dp_size, pin_memory=self.device.type == "cuda",
                                      persistent=True)
        data_iterator = iter(loader)
        window_losses, window_norms, skipped = [], [], 0
        window_start, window_excluded, window_iters = time.monotonic(), 0.0, 0
        stopped_by_signal = False
        while self.iteration < batch.train_iters:
            loss, grad_norm, lr, updated, diverged = self.train_step(data_iterator)
            self.iteration += 1
            self.consumed_samples += batch.global_batch_size
            window_iters += 1
            if diverged:
                self._diverged(loss, grad_norm, diverged)
            else:
                window_losses.append(loss)
            if updated:
                window_norms.append(grad_norm)
            else:
                skipped += 1

            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == batch.train_iters:
                iter_losses = torch.stack(window_losses) if window_losses else torch.full((1, 2), math.nan)
                mean_loss = (iter_losses[:, 0] / iter_losses[:, 1]).mean().item()
                elapsed = time.monotonic() - window_start - window_excluded
                stats = interval_stats(iterations=window_iters, seconds=elapsed,
                                       tokens_per_iteration=self.tokens_per_iteration,
                                       flops_per_iteration=self.flops_per_iteration,
                                       world_size=self.world, peak=self.peak)
                mem, mem_kind = memory_gib(self.device)
                m = {"step": self.iteration, "loss": mean_loss, "lr": lr,
                     "grad_norm": (sum(window_norms) / len(window_norms)) if window_norms else float("nan"),
                     **stats, "memory_gib": mem, "memory_kind": mem_kind,
                     "eta_seconds": stats["seconds_per_iteration"] * (batch.train_iters - self.iteration),
                     "consumed_samples": self.consumed_samples,
                     "consumed_tokens": self.consumed_samples * batch.seq_length,
                     "skipped_iterations": skipped}
                print0(progress_line(m, batch.train_iters, "GPU" if self.device.type == "cuda" else "rank"))
                self.logger.record("train", self.iteration, m, scalars={
                    "train/loss": m["loss"], "train/lr": lr, "train/grad_norm": m["grad_norm"],
                    "perf/tokens_per_second": m["tokens_per_second"],
                    "perf/tflops_per_gpu": m["tflops_per_gpu"], "perf/mfu": m["mfu"],
                    "perf/memory_gib": mem, "perf/seconds_per_iteration": m["seconds_per_iteration"]})
                window_losses, window_norms, skipped = [], [], 0
                window_start, window_excluded, window_iters = time.monotonic(), 0.0, 0

            eval_interval = cfg.data.eval_interval
            if self.valid_ds is not None and eval_interval and self.iteration % eval_interval == 0:
                window_excluded += self._validate("valid", self.valid_ds)
            if ckpt.save_interval and self.iteration % ckpt.save_interval == 0:
                window_excluded += self._save()
            timed = ckpt.exit_duration_in_mins is not None
            if timed and (time.monotonic() - self.launched) / 60 > ckpt.exit_duration_in_mins:
                self.stop_requested = True
            if (ckpt.exit_signal_handler or timed) and self._stop_agreed():
                why = "SIGTERM received" if self.signalled else "--exit-duration-in-mins reached"
                print0(f"{why}: saving and stopping at step {self.iteration}")
                stopped_by_signal = True
                break

        if ckpt.save and self.last_saved != self.iteration:
            self._save()
        if not stopped_by_signal:
            if self.valid_ds is not None and self.last_validated != self.iteration:
                self._validate("valid", self.valid_ds)
            if self.test_ds is not None:
                self._validate("test", self.test_ds)
        self.logger.record("end", self.iteration, {"consumed_samples": self.consumed_samples,
                                                   "stopped_by_signal": stopped_by_signal})
        print0(f"done: step {self.iteration}/{batch.train_iters}, "
               f"{self.consumed_samples * batch.seq_length:,} tokens consumed")

    def close(self) -> None:
        self.logger.close()


def dry_run_report(cfg: TrainingConfig) -> str:
    """--dry-run: the resolved configuration (JSON) and what the model will be, without training.
    main() has loaded the tokenizer (its files are checked and the vocabulary sized)."""
    counts = parameter_counts(cfg.model.arch, cfg.model.padded_vocab_size)
    batch = cfg.batch
    lines = [json.dumps({**cfg.flags, "parameters": counts}, indent=2, sort_keys=True),
             f"dry run: configuration valid; model {_millions(counts['total'])} parameters, "
             f"{cfg.model.recipe.name} recipe, {batch.train_iters} steps of "
             f"{batch.global_batch_size} x {batch.seq_length} tokens"]
    lines += cfg.execution.execution_notes
    lines += cfg.logging.ignored_flags
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line is parsed and finalized here, and becomes the one TrainingConfig the
    run is built from."""
    args = parse_args(argv)
    env = distributed.LaunchEnv.from_environ()
    try:
        finalize_args(args, env.world_size)
        tokenizer = data_lib.load_tokenizer(args.tokenizer_type, args.tokenizer_model,
                                            args.vocab_size)
        problems = preflight.output_problems(args, tokenizer.vocab_size)
        if problems:
            raise ConfigError(problems)
    except ConfigError as e:
        if env.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    cfg = TrainingConfig.from_args(args, tokenizer.vocab_size)
    if cfg.execution.dry_run:
        if env.rank == 0:
            print(dry_run_report(cfg))
        return 0
    device = distributed.device_for(env)
    if cfg.execution.deterministic_mode:
        # Before CUDA and NCCL start: both read these once.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ.setdefault("NCCL_ALGO", "Ring")
        # Not warn-only: torch then keeps the non-deterministic attention backward (cuDNN /
        # memory-efficient SDPA) that made two identical GPU runs drift apart within steps.
        torch.use_deterministic_algorithms(True)
    start = time.monotonic()
    with cpu_training():
        distributed.initialize(cfg, env, device)
        try:
            # Graph capture needs the model built on the (non-default) stream it is captured on.
            with cuda_graph.side_stream(cfg.execution.cuda_graph, device):
                trainer = Trainer(cfg, tokenizer, env, device)
                try:
                    trainer.train()
                finally:
                    trainer.close()
            print0(f"wall time {format_duration(time.monotonic() - start)}")
        except (CheckpointError, TrainingDiverged) as e:
            if torch.distributed.get_rank() == 0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            distributed.shutdown()
    return 0
