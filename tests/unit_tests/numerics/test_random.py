import numpy as np
import torch

from megatron_averis.numerics.random import StepSeed, mix_seed, position_uniform


def test_shards_draw_the_bits_of_the_whole(device):
    full = position_uniform((64, 48), seed=123, device=device)
    top = position_uniform((32, 48), seed=123, offset=(0, 0), device=device)
    bottom = position_uniform((32, 48), seed=123, offset=(32, 0), device=device)
    right = position_uniform((64, 16), seed=123, offset=(0, 32), device=device)
    assert torch.equal(torch.cat([top, bottom]), full)
    assert torch.equal(right, full[:, 32:])


def test_uniform_statistics_and_seed_dependence(device):
    u = position_uniform((512, 512), seed=5, device=device).double().cpu().numpy().ravel()
    n = u.size
    assert u.min() >= 0 and u.max() < 1
    # mean and variance of U[0,1) within 6 sigma; 16-bin histogram chi-square below a loose bound
    assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 6 * np.sqrt(1 / 180 / n)
    counts = np.histogram(u, bins=16, range=(0, 1))[0]
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum()
    assert chi2 < 60  # 15 dof: p < 1e-6 beyond this
    # neighbouring rows/columns are not correlated
    m = u.reshape(512, 512)
    assert abs(np.corrcoef(m[:, :-1].ravel(), m[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(m[:-1].ravel(), m[1:].ravel())[0, 1]) < 0.02
    other = position_uniform((512, 512), seed=6, device=device).double().cpu().numpy().ravel()
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.02
    assert mix_seed(1, 2, 3) != mix_seed(1, 2, 4) != mix_seed(2, 2, 3)


def _slow_mix(*parts):
    """mix_seed written out from its definition, on Python ints only."""
    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) % 2**32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) % 2**32
        return h ^ (h >> 16)
    h = 0x243F6A88
    for p in parts:
        h = fmix(((h ^ (p % 2**32)) * 0x01000193) % 2**32)
    return h


def test_step_seed_draws_the_bits_of_the_seed_with_the_step_appended(device):
    """A StepSeed whose step lives in a device tensor draws mix_seed(*parts, step)'s bits; moving
    the step in place moves the stream (what a replayed CUDA graph relies on)."""
    assert mix_seed(7, 3, 11) == _slow_mix(7, 3, 11)
    step = torch.tensor([41], dtype=torch.int64, device=device)
    seed = StepSeed(mix_seed(7, 3), step)
    assert int(seed.resolve().item()) == _slow_mix(7, 3, 41)
    got = position_uniform((24, 40), seed, offset=(8, 16), device=device)
    assert torch.equal(got, position_uniform((24, 40), _slow_mix(7, 3, 41), offset=(8, 16),
                                             device=device))
    step.fill_(42)
    moved = position_uniform((24, 40), seed, offset=(8, 16), device=device)
    assert torch.equal(moved, position_uniform((24, 40), _slow_mix(7, 3, 42), offset=(8, 16),
                                               device=device))
    assert (moved != got).float().mean() > 0.99
