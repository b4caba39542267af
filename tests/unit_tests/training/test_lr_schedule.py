"""The learning rate each iteration trains with, against the schedules written out by hand."""

import math
from types import SimpleNamespace

import pytest

from megatron_averis.training.arguments import schedule_in_samples
from megatron_averis.training.config import OptimizerConfig, ScheduleConfig
from megatron_averis.training.optim import build_scheduler

GBS = 8


def lr_per_iteration(**flags):
    defaults = dict(global_batch_size=GBS, lr_warmup_init=0.0, weight_decay=0.1,
                    lr_wsd_decay_iters=None, lr_wsd_decay_style="linear", train_samples=None,
                    lr_warmup_fraction=None)
    args = SimpleNamespace(**{**defaults, **flags})
    optimizer = SimpleNamespace(param_groups=[{"params": []}])
    adam = OptimizerConfig(lr=args.lr, min_lr=args.min_lr, decoupled_lr=None, decoupled_min_lr=None,
                           weight_decay=args.weight_decay, adam_beta1=0.9, adam_beta2=0.999,
                           adam_eps=1e-8, clip_grad=1.0)
    schedule = ScheduleConfig(lr_warmup_init=args.lr_warmup_init,
                              lr_decay_style=args.lr_decay_style,
                              lr_wsd_decay_style=args.lr_wsd_decay_style,
                              lr_schedule_samples=schedule_in_samples(args))
    sched = build_scheduler(adam, schedule, optimizer)
    lrs = []
    for _ in range(args.train_iters):
        lrs.append(optimizer.param_groups[0]["lr"])  # what the optimizer step of this iteration uses
        sched.step(increment=GBS)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    return lrs


def test_warmup_then_cosine():
    peak, floor, warm, total = 3e-4, 3e-5, 10, 50
    got = lr_per_iteration(lr=peak, min_lr=floor, lr_warmup_iters=warm, lr_decay_iters=total,
                           train_iters=total + 5, lr_decay_style="cosine")

    def expected(i):  # i = optimizer steps taken before this iteration
        if i <= warm:
            return peak * i / warm
        if i > total:
            return floor
        t = (i - warm) / (total - warm)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))

    assert got == pytest.approx([expected(i) for i in range(total + 5)], rel=1e-12, abs=1e-15)
    assert got[warm] == pytest.approx(peak) and got[total] == pytest.approx(floor)


def test_wsd_holds_then_decays():
    peak, floor, warm, total, decay = 1e-3, 1e-4, 5, 40, 10
    got = lr_per_iteration(lr=peak, min_lr=floor, lr_warmup_iters=warm, lr_decay_iters=total,
                           train_iters=total, lr_decay_style="WSD", lr_wsd_decay_iters=decay,
                           lr_wsd_decay_style="linear")

    def expected(i):
        if i <= warm:
            return peak * i / warm
        if i <= total - decay:
            return peak  # stable phase
        return floor + (peak - floor) * (1 - (i - (total - decay)) / decay)

    assert got == pytest.approx([expected(i) for i in range(total)], rel=1e-12, abs=1e-15)
    assert got[total - decay] == peak and got[total - 1] == pytest.approx(floor + (peak - floor) / decay)
