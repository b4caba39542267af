"""Data-parallel wrapping, the megatron optimizer and the learning-rate schedule.

Gradients accumulate in FP32 buffers (main_grad) whatever the parameter dtype; with --bf16 the
optimizer keeps FP32 main parameters and Adam moments and copies BF16 weights back after each
step (megatron-core's mixed-precision optimizer, sharded over data-parallel ranks with
--use-distributed-optimizer). Schedule steps count samples, as in Megatron-LM, so iteration
lengths in the flags are multiplied by the global batch size.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_averis.training import cuda_graph
from megatron_averis.training.config import OptimizerConfig, ScheduleConfig, TrainingConfig


def wrap_data_parallel(cfg: TrainingConfig, config, model_chunks):
    parallel = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not parallel.grad_reduce_in_bf16,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        # The divergence guard (divergence.py) checks the global gradient norm instead: this
        # per-bucket check raises before the step is logged (as "iteration -1") and cannot skip it.
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(model_chunks)
    ]
    for chunk in wrapped:
        # Data-parallel replicas start from rank 0's weights.
        chunk.broadcast_params()
    # The pipeline schedules call these around micro-batches: no gradient all-reduce until the
    # last micro-batch, then DP reduction, SP/tied-embedding gradient sums and 1/tokens scaling.
    config.no_sync_func = wrapped[0].no_sync if len(wrapped) == 1 else [m.no_sync for m in wrapped]
    config.finalize_model_grads_func = (cuda_graph.finalize_model_grads_capturable
                                        if cfg.execution.cuda_graph else finalize_model_grads)
    if parallel.overlap_grad_reduce:
        config.grad_sync_func = (wrapped[0].start_grad_sync if len(wrapped) == 1
                                 else [m.start_grad_sync for m in wrapped])
    return wrapped


def build_optimizer(cfg: TrainingConfig, config, model_chunks):
    bf16 = cfg.model.bf16
    megatron_config = MegatronOptimizerConfig(
        optimizer="adam",
        # lr, min_lr, decoupled_lr/min_lr, weight_decay, adam_beta1/2, adam_eps, clip_grad: the
        # fields of our OptimizerConfig carry megatron-core's names.
        **dataclasses.asdict(cfg.optimizer),
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(megatron_config, model_chunks)
    fuse_torch_adam(optimizer)
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def chained(optimizer) -> list:
    """The megatron-core optimizers behind `optimizer`: a ChainedOptimizer's parts, or itself."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_torch_adam(inner) -> bool:
    """torch's Adam/AdamW: what megatron-core builds when neither Transformer Engine nor apex
    provides a fused Adam (those keep no per-parameter step)."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam/AdamW optimizers inside a megatron-core optimizer (chained or not)."""
    inner = (getattr(opt, "optimizer", None) for opt in chained(optimizer))
    return [o for o in inner if is_torch_adam(o)]


def fuse_torch_adam(optimizer) -> None:
    """Run megatron-core's torch AdamW fallback as torch's fused kernel on CUDA.

    Without TE or apex megatron-core builds torch.optim.AdamW with its defaults, i.e. the
    multi-tensor `foreach` implementation: several passes over parameters, gradients and both
    moments per step. torch's `fused` implementation makes one pass, as TE's and apex's
    FusedAdam do. Set before the first step, when Adam has no state yet (the step counters are
    then created on the device, as fused Adam needs). CPU runs keep the default."""
    for adam in torch_adams(optimizer):
        params = [p for group in adam.param_groups for p in group["params"]]
        if adam.state or not params or any(p.device.type != "cuda" for p in params):
            continue
        for group in adam.param_groups:
            group.update(fused=True, foreach=False)


def build_scheduler(adam: OptimizerConfig, schedule: ScheduleConfig,
                    optimizer) -> OptimizerParamScheduler:
    steps = schedule.lr_schedule_samples
    return OptimizerParamScheduler(
        optimizer,
        init_lr=schedule.lr_warmup_init,
        max_lr=adam.lr,
        min_lr=adam.min_lr,
        lr_warmup_steps=steps["warmup"],
        lr_decay_steps=steps["decay"],
        lr_decay_style=schedule.lr_decay_style,
        start_wd=adam.weight_decay,
        end_wd=adam.weight_decay,
        wd_incr_steps=steps["train"],
        wd_incr_style="constant",
        # The command line wins over a checkpoint's schedule (megatron-core checks they agree).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=steps["wsd"],
        lr_wsd_decay_style=schedule.lr_wsd_decay_style,
    )
