import numpy as np
import pytest
import torch

from fp4_reference import E2M1_GRID, e2m1_rne
from megatron_averis.numerics import decode_e2m1, encode_e2m1, pack_fp4, unpack_fp4
from megatron_averis.numerics.random import position_uniform

# E2M1 by the OCP MX definition: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0;
# exponent 0 is subnormal (0.5 · m).
def _spec_value(code: int) -> float:
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = 0.5 * m if e == 0 else 2.0 ** (e - 1) * (1 + 0.5 * m)
    return -mag if s else mag


def test_decode_all_16_codes(device):
    codes = torch.arange(16, dtype=torch.uint8, device=device)
    got = decode_e2m1(codes).cpu().tolist()
    want = [_spec_value(c) for c in range(16)]
    assert got == want
    assert str(got[8]) == "-0.0"


def test_encode_decode_roundtrip_exact_values(device):
    vals = torch.tensor([_spec_value(c) for c in range(16)], device=device)
    codes = encode_e2m1(vals)
    # -0.0 encodes as +0 (sign of zero is not kept); every other code round-trips.
    assert torch.equal(decode_e2m1(codes), vals.abs().where(vals == 0, vals))


def test_rne_ties_at_every_midpoint(device):
    mids = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
    x = np.concatenate([mids, -mids])
    got = decode_e2m1(encode_e2m1(torch.tensor(x, dtype=torch.float32, device=device)))
    np.testing.assert_array_equal(got.cpu().numpy(), e2m1_rne(x))
    # and the even neighbour explicitly: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    np.testing.assert_array_equal(got[: len(mids)].cpu().numpy(), [0, 1, 1, 2, 2, 4, 4])


def test_rne_random_values_and_saturation(device):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(20000, generator=g) * 16 - 8).to(device)
    got = decode_e2m1(encode_e2m1(x)).cpu().numpy()
    np.testing.assert_array_equal(got, e2m1_rne(x.cpu().numpy().astype(np.float64)))


def test_pack_unpack_layout(device):
    codes = torch.randint(0, 16, (6, 8), dtype=torch.uint8, device=device)
    packed = pack_fp4(codes)
    c = codes.cpu().numpy().astype(int)
    want = c[:, 0::2] | (c[:, 1::2] << 4)
    np.testing.assert_array_equal(packed.cpu().numpy(), want)
    assert torch.equal(unpack_fp4(packed), codes)
    with pytest.raises(ValueError, match="odd number"):
        pack_fp4(codes[:, :3])


def test_stochastic_rounding_unbiased(device):
    # Each value drawn n times; the mean of the rounded values must be within 5 sigma of x,
    # sigma = gap/(2 sqrt(n)) bounds the standard deviation of a two-point draw.
    n = 4000
    x = torch.tensor([0.1, 0.3, 0.74, 1.2, 1.9, 2.2, 2.9, 3.3, 4.5, 5.9, -0.6, -2.7], device=device)
    xs = x.repeat(n, 1)
    u = position_uniform(tuple(xs.shape), seed=7, device=device)
    vals = decode_e2m1(encode_e2m1(xs, "stochastic", u)).double()
    mean = vals.mean(0).cpu().numpy()
    grid = E2M1_GRID
    for xi, mi in zip(x.cpu().numpy(), mean):
        a = abs(xi)
        lo = grid[grid <= a].max()
        hi = grid[grid >= a].min()
        gap = max(hi - lo, 1e-9)
        assert abs(mi - xi) <= 5 * gap / (2 * np.sqrt(n)), (xi, mi)
    # every draw is one of the two neighbours
    for j, xi in enumerate(x.cpu().numpy()):
        a = abs(xi)
        allowed = {np.sign(xi) * grid[grid <= a].max(), np.sign(xi) * grid[grid >= a].min()}
        assert set(np.unique(vals[:, j].cpu().numpy())) <= allowed


def test_stochastic_rounding_needs_draws():
    with pytest.raises(ValueError, match="uniform"):
        encode_e2m1(torch.ones(4), "stochastic")
    with pytest.raises(ValueError, match="unknown rounding"):
        encode_e2m1(torch.ones(4), "nearest")
