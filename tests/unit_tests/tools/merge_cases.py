"""Worker for test_checkpoint_merge.py: a tiny model saved with dist_checkpointing under a TP or
PP layout (spawned processes import this module by name)."""

from __future__ import annotations

import dataclasses
import zlib

import torch

CONFIG = {
    "arch": {"ffn_hidden_size": 192, "hidden_size": 64, "init_method_std": 0.02, "kv_channels": 32,
             "max_position_embeddings": 256, "norm_epsilon": 1e-6, "num_attention_heads": 4,
             "num_layers": 2, "num_query_groups": 2, "qk_layernorm": True, "rotary_base": 10000.0,
             "tie_embeddings": True},
    "bf16": True, "padded_vocab_size": 256, "recipe": {"name": "bf16"}, "run_name": "merge",
}


def save_layouts(rank, world, out_dirs):
    """Saves the model under TP=2 into out_dirs["tp2"], then under PP=2 into out_dirs["pp2"]."""
    return {"tp2": save_worker(rank, 2, 1, out_dirs["tp2"]),
            "pp2": save_worker(rank, 1, 2, out_dirs["pp2"])}


def save_worker(rank, tp, pp, out_dir):
    """Saves this rank's model chunk; returns its state dict and first global layer."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_averis.diagnostics import checkpoint as ckpt
    from megatron_averis.training.cpu_compat import cpu_training
    from megatron_averis.training.model import build_model, transformer_config

    parallel_state.initialize_model_parallel(tp, pp)
    try:
        args = dataclasses.replace(ckpt.model_config(CONFIG), tensor_model_parallel_size=tp,
                                   pipeline_model_parallel_size=pp)
        torch.manual_seed(0)
        cpu = torch.device("cpu")
        with cpu_training():
            model = build_model(args, transformer_config(args, cpu), cpu)[0]
            with torch.no_grad():  # norm weights that differ per layer (they start as ones)
                for name, p in model.named_parameters():
                    if "layernorm" in name:
                        seed = zlib.crc32(f"{name}/{parallel_state.get_pipeline_model_parallel_rank()}"
                                          .encode())
                        p.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(seed))
            # What the trainer's checkpoint holds for the tools: the model, the run configuration
            # and (common state, as in Megatron-LM's layout) the iteration.
            dist_checkpointing.save({"model": model.sharded_state_dict(), "config": CONFIG,
                                     "iteration": 7}, out_dir)
        offset = model.decoder.layers[0].layer_number - 1
        return {"offset": offset, "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()
                          if isinstance(v, torch.Tensor)}}
    finally:
        parallel_state.destroy_model_parallel()
