"""The typed configuration: every finalized flag lands in exactly one field (or is folded into
one at finalize), it is built once from the stored Megatron-LM command, and the trainer's
modules read it rather than the argparse namespace."""

from test_megatron_command import stored_command

from megatron_averis.training.arguments import finalize_args, parse_args
from megatron_averis.training.config import (TrainingConfig, field_flags, folded_at_finalize,
                                             ModelConfig)



def test_every_finalized_flag_has_exactly_one_home(tmp_path):
    args = finalize_args(parse_args(stored_command(tmp_path)), 1)
    homes = field_flags()  # raises if a flag is a field of two sections
    folded = folded_at_finalize()
    assert not set(homes) & folded
    derived = {"tokenizer_vocab_size", "padded_vocab_size"}  # set from the loaded tokenizer
    assert set(vars(args)) | derived == set(homes) | folded, (
        "a new flag needs a field in training/config.py, or a place in folded_at_finalize()")


def test_model_config_is_the_model_section(tmp_path):
    args = finalize_args(parse_args(stored_command(tmp_path)), 1)
    config = TrainingConfig.from_args(args, 1000)
    assert isinstance(config.model, ModelConfig) and config.model.padded_vocab_size == 1187  # 1000 up to a multiple of 1187
