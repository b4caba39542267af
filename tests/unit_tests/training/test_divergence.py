"""The divergence guard's verdicts against numpy's median, its flags, and its state round trip."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from test_arguments import argv, files  # noqa: F401 (fixture)

from megatron_averis.training.config import FaultToleranceConfig
from megatron_averis.training.divergence import DivergenceGuard, flag_problems


def guard_args(**over):
    base = dict(check_for_nan_in_loss_and_grad=True, check_for_spiky_loss=True,
                spiky_loss_factor=10.0, check_for_large_grads=True, large_grads_factor=5.0,
                divergence_window=4, divergence_action="skip", max_skipped_steps=2)
    return FaultToleranceConfig(**{**base, **over})


def test_nan_and_inf_are_divergence():
    guard = DivergenceGuard(guard_args())
    assert guard.assess(float("nan"), 1.0) == ["loss is nan"]
    assert guard.assess(3.0, float("inf")) == ["gradient norm is inf"]
    off = DivergenceGuard(guard_args(check_for_nan_in_loss_and_grad=False))
    assert off.assess(float("nan"), float("nan")) == []


def test_spikes_are_judged_against_the_median_of_the_window():
    guard = DivergenceGuard(guard_args())
    losses, norms = [7.0, 6.5, 6.0, 9.0, 5.5], [1.0, 2.0, 8.0, 1.5, 1.2]
    for loss, norm in zip(losses, norms):
        guard.healthy(loss, norm)
    window_loss, window_norm = np.median(losses[-4:]), np.median(norms[-4:])  # window 4
    assert guard.assess(10 * window_loss, 5 * window_norm) == []  # at the factor: healthy
    loss, norm = 10 * window_loss * (1 + 1e-9), 5 * window_norm * 1.01
    assert guard.assess(loss, norm) == [
        f"loss {loss:.6g} > 10 x {window_loss:.6g}, the median of the last 4 healthy steps",
        f"gradient norm {norm:.6g} > 5 x {window_norm:.6g}, the median of the last 4 healthy steps"]
    quiet = DivergenceGuard(guard_args(check_for_spiky_loss=False, check_for_large_grads=False))
    quiet.healthy(1.0, 1.0)
    assert quiet.assess(1e6, 1e6) == []
    assert DivergenceGuard(guard_args()).assess(1e6, 1e6) == []  # no history yet


def test_skip_policy_aborts_after_too_many_in_a_row():
    guard = DivergenceGuard(guard_args(max_skipped_steps=2))
    assert [guard.must_abort() for _ in range(3)] == [False, False, True]
    guard.healthy(1.0, 1.0)
    assert guard.must_abort() is False and guard.skipped_in_a_row == 1
    assert DivergenceGuard(guard_args(divergence_action="abort")).must_abort() is True


def test_state_round_trip():
    guard = DivergenceGuard(guard_args())
    for i in range(6):
        guard.healthy(float(i), float(i) / 2)
    guard.must_abort()
    restored = DivergenceGuard(guard_args())
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() == {
        "losses": [2.0, 3.0, 4.0, 5.0], "grad_norms": [1.0, 1.5, 2.0, 2.5], "skipped_in_a_row": 1}
    restored.load_state_dict(None)  # a checkpoint from before the guard: nothing to restore
    assert restored.state_dict() == guard.state_dict()


@pytest.mark.parametrize("over,problem", [
    ({"spiky_loss_factor": 1.0}, "--spiky-loss-factor must be > 1"),
    ({"large_grads_factor": math.nan}, "--large-grads-factor must be > 1"),
    ({"divergence_window": 0}, "--divergence-window must be >= 1, got 0"),
    ({"max_skipped_steps": 0}, "--max-skipped-steps must be >= 1, got 0"),
])
def test_flag_problems(over, problem):
    assert any(p.startswith(problem) for p in flag_problems(guard_args(**over)))
    assert flag_problems(guard_args()) == []


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_guarded_step_updates_exactly_like_megatron_cores_step(files, bf16):  # noqa: F811
    """Two copies of the tiny model under the trainer's DDP and optimizer, the same gradients:
    megatron-core's optimizer.step() and guarded_step (healthy verdicts) leave identical
    weights and report the same gradient norm, step after step; a diverged verdict changes no
    weight."""
    import torch

    from megatron_averis.diagnostics.checkpoint import single_process
    from megatron_averis.training.arguments import finalize_args, parse_args
    from megatron_averis.training.config import TrainingConfig
    from megatron_averis.training.cpu_compat import cpu_training
    from megatron_averis.training.divergence import guarded_step
    from megatron_averis.training.model import build_model, transformer_config
    from megatron_averis.training.optim import build_optimizer, wrap_data_parallel
    from megatron_averis.training.rng_state import seed_everything

    args = finalize_args(parse_args(argv(files, "--model-preset", "tiny", "--seq-length", "32",
                                         "--clip-grad", "0.05", *(["--bf16"] if bf16 else []))), 1)
    cfg = TrainingConfig.from_args(args, 128)  # padded: 128 already a multiple of 128
    cpu = torch.device("cpu")
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(32).expand(2, -1)

    def build():
        seed_everything(args.seed, 0)
        config = transformer_config(cfg.model, cpu)
        model = wrap_data_parallel(cfg, config, build_model(cfg.model, config, cpu))
        return model, build_optimizer(cfg, config, model)

    def backward(model, optimizer):
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        model[0](tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean().backward()

    with single_process(), cpu_training():
        (ref_model, ref_opt), (model, opt) = build(), build()
        for _ in range(3):
            backward(ref_model, ref_opt)
            ref_updated, ref_norm, _ = ref_opt.step()
            backward(model, opt)
            updated, norm, reasons = guarded_step(opt, lambda n: [])
            assert (updated, reasons) == (ref_updated, []) and norm == ref_norm
            ref_state, state = ref_model[0].state_dict(), model[0].state_dict()
            assert all(torch.equal(ref_state[k], state[k]) for k in ref_state
                       if isinstance(ref_state[k], torch.Tensor))
        backward(model, opt)
        before = {k: v.clone() for k, v in model[0].state_dict().items() if isinstance(v, torch.Tensor)}
        assert guarded_step(opt, lambda n: ["diverged"])[0::2] == (False, ["diverged"])
        assert all(torch.equal(before[k], v) for k, v in model[0].state_dict().items() if k in before)


def test_abort_is_logged_under_the_real_step_and_says_what_is_left(monkeypatch):
    import torch

    from megatron_averis.training import loop
    from megatron_averis.training.divergence import TrainingDiverged

    trainer = loop.Trainer.__new__(loop.Trainer)  # only what _diverged reads
    trainer.cfg = SimpleNamespace(checkpoint=SimpleNamespace(save=None))
    trainer.guard = DivergenceGuard(guard_args(divergence_action="abort", max_skipped_steps=10))
    records = []
    trainer.logger = SimpleNamespace(record=lambda event, step, values: records.append(
        (event, step, values)))
    trainer.iteration, trainer.consumed_samples = 37, 148
    monkeypatch.setattr(loop, "print0", lambda *parts: None)
    with pytest.raises(TrainingDiverged) as e:
        trainer._diverged(torch.tensor([float("nan"), 10.0]), float("inf"),
                          ["loss is nan", "gradient norm is inf"])
    assert str(e.value) == (
        "training diverged at step 37 (loss is nan; gradient norm is inf). Nothing was saved after "
        "step 36, the last healthy one; there is no checkpoint. Resume with a lower --lr (--load, "
        "--ckpt-step), or pass --divergence-action skip to drop diverged steps (docs/training.md, "
        "'When things go wrong')")
    (event, step, values), = records
    assert (event, step, values["action"], values["last_healthy_step"]) == ("divergence", 37, "abort", 36)
    assert math.isnan(values["loss"]) and values["grad_norm"] == float("inf")
