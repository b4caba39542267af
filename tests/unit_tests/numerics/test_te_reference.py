"""External check: Transformer Engine's NVFP4 reference quantizer and ours give the same codes
and scales (GPU with Transformer Engine only; skipped elsewhere)."""

import pytest
import torch

from megatron_averis.numerics import blockwise_rht, quantize_nvfp4, unpack_fp4

pytestmark = pytest.mark.gpu


def _te():
    ref = pytest.importorskip("transformer_engine.pytorch.custom_recipes.reference_nvfp4")
    utils = pytest.importorskip("transformer_engine.pytorch.custom_recipes.reference_utils")
    return ref, utils


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g) * torch.logspace(-3, 1, 512).view(1, -1)
    x[:, 7] += 30.0
    x[3, 100:116] *= 1e-5  # a block with a subnormal E4M3 scale
    return x.to("cuda", torch.bfloat16)


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_codes_and_scales_match_te(tile):
    ref, utils = _te()
    x = _inputs()
    q = ref.NVFP4QuantizerRef(dtype=utils.Fp4Formats.E2M1, rowwise=True, columnwise=True,
                              quant_tile_shape=tile, with_rht=False)
    te = q.quantize(x)
    for src, data, scale in ((x, te.data, te.scale), (x.t().contiguous(), te.data_t, te.scale_t)):
        ours = quantize_nvfp4(src, tile)
        assert torch.equal(ours.data, data.view(torch.uint8)), "FP4 codes differ from TE"
        scales = ours.block_scales.float()
        if tile[0] > 1:
            scales = scales.repeat_interleave(tile[0], dim=0)
        assert torch.equal(scales, scale.float()[: scales.shape[0], : scales.shape[1]]), "scales differ"


def test_rht_columnwise_close_to_te():
    """TE's reference applies the RHT in the input dtype (BF16) while ours rotates in FP32, so
    codes may differ where BF16 rounding of the rotated value crosses a rounding boundary."""
    ref, utils = _te()
    x = _inputs()
    q = ref.NVFP4QuantizerRef(dtype=utils.Fp4Formats.E2M1, rowwise=True, columnwise=True,
                              quant_tile_shape=(1, 16), with_rht=True)
    te = q.quantize(x)
    signs = ref.get_wgrad_sign_vector()
    ours = quantize_nvfp4(blockwise_rht(x.t().contiguous(), signs))
    diff = (unpack_fp4(ours.data) != unpack_fp4(te.data_t.view(torch.uint8))).float().mean().item()
    print(f"RHT columnwise code mismatch vs TE (BF16 vs FP32 rotation): {diff:.4%}")
    assert diff < 0.05
