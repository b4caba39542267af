"""Data-parallel wrapping, the megatron optimizer and the learning-rate schedule.

Gradients accumulate in FP32 buffers (main_grad) whatever the parameter dtype; with --bf16 the
optimizer keeps FP32 main parameters and Adam moments and copies BF16 weights back after each
step (megatron-core's mixed-precision optimizer, sharded over data-parallel ranks with
--use-distributed-optimizer). Schedule steps count samples, as in Megatron-LM, so iteration
lengths in the flags are multiplied by the global batch size.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_averis.training import cuda_graph


def wrap_data_parallel(args, config, model_chunks):
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not args.grad_reduce_in_bf16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
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
                                        if cuda_graph.enabled(args) else finalize_model_grads)
    if args.overlap_grad_reduce:
        config.grad_sync_func = (wrapped[0].start_grad_sync if len(wrapped) == 1
                                 else [m.start_grad_sync for m in wrapped])
    return wrapped


def build_optimizer(args, config, model_chunks):
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
        clip_grad=args.clip_grad,
        decoupled_lr=args.decoupled_lr,
        decoupled_min_lr=args.decoupled_min_lr,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def schedule_in_samples(args) -> dict:
    """Megatron-LM's schedule lengths in samples, from iteration- or sample-based flags:
    train, decay (default: the training length), warm-up (--lr-warmup-fraction of the decay, else
    the warm-up flag) and the WSD decay (None without one)."""
    gbs = args.global_batch_size
    if args.train_samples is not None:
        train = args.train_samples
        decay = args.lr_decay_samples if args.lr_decay_samples is not None else train
        warmup = args.lr_warmup_samples
        wsd = args.lr_wsd_decay_samples
    else:
        train = args.train_iters * gbs
        decay = (args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters) * gbs
        warmup = args.lr_warmup_iters * gbs
        wsd = args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters is not None else None
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay)
    return {"train": train, "decay": decay, "warmup": warmup, "wsd": wsd}


def build_scheduler(args, optimizer) -> OptimizerParamScheduler:
    steps = schedule_in_samples(args)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=steps["warmup"],
        lr_decay_steps=steps["decay"],
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=steps["train"],
        wd_incr_style="constant",
        # The command line wins over a checkpoint's schedule (megatron-core checks they agree).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=steps["wsd"],
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )
