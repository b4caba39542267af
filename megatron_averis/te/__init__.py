"""Averis as a Transformer Engine CustomRecipe (TE >= 2.20, optional).

- factories.py: the qfactory callables (presets averis, averis_rht, nvfp4, nvfp4_nohadamard, nvfp4_plain, and the
  trainer's `configured` recipe) for CustomRecipe / Megatron-LM's --fp4-quantizer-factory;
- roles.py: TE quantizer roles -> our GEMM operands;
- core.py: the GEMMs through our numerics (no TE needed); operands come from the linear
  layer's per-role quantizer, megatron_averis.linear.operands;
- quantizer.py: TE's Quantizer / QuantizedTensorStorage subclasses (needs TE);
- binding.py, stats.py: per-layer context, TP layout, sequence-parallel shard detection;
- native.py: Blackwell's native NVFP4 GEMM for the residual product;
- model.py: megatron-core's TE GPT layer spec under this recipe (the trainer's
  --transformer-impl transformer_engine);
- availability.py: the TE check and its error.

Importing this package does not import Transformer Engine.
"""

from megatron_averis.te.availability import TransformerEngineMissing, require_te, te_installed

__all__ = ["TransformerEngineMissing", "require_te", "te_installed"]
