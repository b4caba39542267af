"""Layer specs for Megatron-LM's own pretrain_gpt.py: `--spec megatron_averis.megatron.spec NAME`.

Megatron-LM imports NAME from this module (megatron-core's spec_utils.import_module) and builds
every decoder layer from it, so its training loop, data, checkpoints and logging run our layers:
the four linears of each layer under the named recipe (Averis linears, emulated FP4 on Hopper or
the Triton kernels), SDPA attention and RMSNorm, the q/k norms following --qk-layernorm. NAME is
a recipe preset with '-' written '_': bf16, nvfp4, nvfp4_nohadamard, nvfp4_plain, averis,
averis_rht, mxfp4. Run it with Megatron-LM's --transformer-impl local and --normalization RMSNorm
--swiglu --disable-bias-linear --position-embedding-type rope (docs/training.md, "Coming from
Megatron-LM"). One spec serves every layer: BF16 edge layers (--first-last-layers-bf16) need this
program's trainer or the Transformer Engine route (megatron_averis.te.factories).
"""

from __future__ import annotations

from megatron_averis.megatron.layer_specs import averis_layer_spec
from megatron_averis.recipes import PRESETS, get_recipe


def _spec(name: str):
    return averis_layer_spec(get_recipe(name), qk_layernorm=None)


SPECS = {name.replace("-", "_"): _spec(name) for name in PRESETS}
globals().update(SPECS)  # module attributes, as Megatron-LM's --spec MODULE NAME imports them
