"""Checkpoints interchange with Megatron-LM in both directions.

A checkpoint is written the way Megatron-LM's save_checkpoint writes one with --ckpt-format
torch_dist (megatron-core's own GPTModel with its local layer spec, dist_checkpointing.save of
{model, args, iteration, checkpoint_version, opt_param_scheduler} and the tracker file), without
optimizer state. The trainer loads its weights (--finetune semantics: iteration 0), takes one step
with a learning rate too small to change an FP32 weight, and saves; megatron-core's model then
loads the trainer's checkpoint and must hold exactly the weights it wrote.
"""

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F
from pretrain_launcher import data_args, launch

from megatron_averis.training.cpu_compat import cpu_training
from megatron_averis.training.presets import PRESETS

pytestmark = pytest.mark.slow

ARCH = PRESETS["tiny"].arch
VOCAB = 1024  # the corpus fixture's tokenizer, already a multiple of 128


def megatron_core_model():
    """Megatron-LM's model for `tiny` (--transformer-impl local): megatron-core's local spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_averis.megatron import cpu_compat

    cpu_compat.install()  # megatron-core's CPU gaps, as the trainer's CPU runs fill them
    config = TransformerConfig(
        num_layers=ARCH.num_layers, hidden_size=ARCH.hidden_size,
        ffn_hidden_size=ARCH.ffn_hidden_size, num_attention_heads=ARCH.num_attention_heads,
        num_query_groups=ARCH.num_query_groups, kv_channels=ARCH.kv_channels,
        qk_layernorm=True, normalization="RMSNorm", layernorm_epsilon=ARCH.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False)
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=ARCH.max_position_embeddings,
                    share_embeddings_and_output_weights=True, position_embedding_type="rope",
                    rotary_base=int(ARCH.rotary_base))


def megatron_lm_args(iteration: int) -> argparse.Namespace:
    """The fields of Megatron-LM's `args` that describe this model and the data position."""
    return argparse.Namespace(
        num_layers=ARCH.num_layers, hidden_size=ARCH.hidden_size,
        ffn_hidden_size=ARCH.ffn_hidden_size, num_attention_heads=ARCH.num_attention_heads,
        group_query_attention=True, num_query_groups=ARCH.num_query_groups,
        kv_channels=ARCH.kv_channels, qk_layernorm=True, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", untie_embeddings_and_output_weights=False,
        padded_vocab_size=VOCAB, ckpt_format="torch_dist", iteration=iteration,
        consumed_train_samples=8 * iteration, consumed_valid_samples=0)


def sharded_metadata():
    from megatron.core import parallel_state

    return {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def write_megatron_lm_checkpoint(root: str, iteration: int) -> dict:
    """Returns the weights written (norms randomised so that a swapped key cannot pass)."""
    from megatron.core import dist_checkpointing

    from megatron_averis.diagnostics.checkpoint import single_process

    with single_process(), cpu_training():
        torch.manual_seed(3)
        model = megatron_core_model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.3)
        state = {"model": model.sharded_state_dict(metadata=sharded_metadata()),
                 "args": megatron_lm_args(iteration), "checkpoint_version": 3.0,
                 "iteration": iteration, "num_floating_point_operations_so_far": 0}
        path = os.path.join(root, f"iter_{iteration:07d}")
        os.makedirs(path)
        dist_checkpointing.save(state, path)
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if isinstance(v, torch.Tensor)}


def write_megatron_lm_checkpoint_with_optimizer(root: str, iteration: int, samples: int) -> None:
    """As Megatron-LM saves after `iteration` steps of `samples` samples: model, its (non
    distributed) Adam state after one real step, the LR schedule, `args`, the tracker."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_averis.diagnostics.checkpoint import single_process

    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    with single_process(), cpu_training():
        torch.manual_seed(3)
        model_parallel_cuda_manual_seed(3)  # Megatron-LM's seeding (dropout streams)
        module = megatron_core_model()
        model = DistributedDataParallel(module.config, DistributedDataParallelConfig(), module)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=0.0),
                                           [model])
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=8, lr_decay_steps=80,
            lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=80,
            wd_incr_style="constant")
        ids = torch.randint(0, VOCAB, (2, 17))
        positions = torch.arange(16).expand(2, 16)
        model(ids[:, :-1], positions, None, labels=ids[:, 1:]).mean().backward()
        model.finish_grad_sync()
        optimizer.step()
        scheduler.step(increment=samples)
        model_sd = module.sharded_state_dict(metadata=sharded_metadata())
        state = {"model": model_sd,
                 "optimizer": optimizer.sharded_state_dict(model_sd, metadata=sharded_metadata()),
                 "opt_param_scheduler": scheduler.state_dict(),
                 "args": megatron_lm_args(iteration), "checkpoint_version": 3.0,
                 "iteration": iteration}
        state["args"].consumed_train_samples = samples
        path = os.path.join(root, f"iter_{iteration:07d}")
        os.makedirs(path)
        dist_checkpointing.save(state, path)
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))


def test_megatron_lm_checkpoint_with_optimizer_resumes(corpus, tmp_path):
    """With optimizer state the Megatron-LM run continues: its iteration, data position and
    learning-rate schedule position, and Adam's state."""
    source = str(tmp_path / "megatron-lm")
    write_megatron_lm_checkpoint_with_optimizer(source, iteration=5, samples=40)
    out = str(tmp_path / "ours")
    run = launch(["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                  "--global-batch-size", "8", "--train-iters", "6", "--lr", "1e-3",
                  "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--eval-iters", "0",
                  "--log-interval", "1", "--wandb-mode", "disabled", "--load", source]
                 + data_args(corpus), nproc=1, log_dir=out)
    assert "(Megatron-LM) at iteration 5 (40 samples consumed" in run.stdout
    # Adam's state loads; Megatron-LM's RNG state has another format and is not restored.
    assert "optimizer state not restored" not in run.stdout and "RNG state not restored" in run.stdout
    step = run.by_step("train")
    assert sorted(step) == [6] and step[6]["consumed_samples"] == 48
    # The LR of step 6 is the schedule after 40 samples (command-line schedule: warm-up 8
    # samples, cosine over 6 x 8 = 48), as an uninterrupted run of ours would use.
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (40 - 8) / (48 - 8)))
    assert step[6]["lr"] == pytest.approx(expected, rel=1e-9)


def read_with_megatron_core(path: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_averis.diagnostics.checkpoint import single_process

    with single_process(), cpu_training():
        model = megatron_core_model()
        loaded = dist_checkpointing.load(
            {"model": model.sharded_state_dict(metadata=sharded_metadata())}, path)
        model.load_state_dict(loaded["model"])
        common = dist_checkpointing.load_common_state_dict(path)
        return common, {k: v.detach().clone() for k, v in model.state_dict().items()
                        if isinstance(v, torch.Tensor)}


def test_megatron_lm_checkpoint_round_trip(corpus, tmp_path):
    source = str(tmp_path / "megatron-lm")
    written = write_megatron_lm_checkpoint(source, iteration=5)

    out = str(tmp_path / "ours")
    run = launch(["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                  "--global-batch-size", "8", "--train-iters", "1", "--lr", "1e-30",
                  "--weight-decay", "0", "--eval-iters", "0", "--log-interval", "1",
                  "--wandb-mode", "disabled", "--load", source, "--save", out]
                 + data_args(corpus), nproc=1, log_dir=out)
    assert "weights of Megatron-LM checkpoint" in run.stdout and "starts at iteration 0" in run.stdout
    # The loaded weights are trained on: the first loss is not the fresh model's ln(vocabulary).
    assert run.by_step("train")[1]["loss"] > 0

    common, read = read_with_megatron_core(os.path.join(out, "iter_0000001"))
    assert common["iteration"] == 1 and common["args"].num_query_groups == ARCH.num_query_groups
    assert sorted(read) == sorted(written)
    for name, tensor in written.items():
        torch.testing.assert_close(read[name], tensor, rtol=0, atol=0, msg=name)


def test_wrong_architecture_is_refused_by_field(corpus, tmp_path):
    source = str(tmp_path / "megatron-lm")
    write_megatron_lm_checkpoint(source, iteration=5)
    with pytest.raises(AssertionError, match="ffn_hidden_size: checkpoint 192, now 256"):
        launch(["--model-preset", "tiny", "--ffn-hidden-size", "256", "--seq-length", "32",
                "--train-iters", "1", "--lr", "1e-3", "--eval-iters", "0",
                "--wandb-mode", "disabled", "--load", source] + data_args(corpus),
               nproc=1, log_dir=str(tmp_path / "logs"))
