"""Training, validation and test batches from megatron-core GPTDatasets over indexed datasets.

Data order is a pure function of (--seed, the blend, --seq-length): megatron-core shuffles and
caches its sample index once. Sample i of the training set is consumed at iteration
i // global_batch; a global batch is the contiguous range [c, c + global_batch), dealt out to
data-parallel ranks in micro-batches. Resuming therefore needs only the number of consumed
samples. Validation uses the same first --eval-iters global batches of the validation set every
time, so successive validation losses are comparable.
"""

from __future__ import annotations

import signal

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_averis.data.tokenizer import build_tokenizer
from megatron_averis.training.config import TrainingConfig


def parse_blend(values: list[str] | None):
    """'P1 P2 ...' or 'W1 P1 W2 P2 ...' -> (prefixes, weights or None) as megatron-core expects."""
    if values is None:
        return None
    try:
        weights = [float(w) for w in values[0::2]]
        weighted = len(values) % 2 == 0
    except ValueError:
        weighted = False
    if weighted:
        return list(values[1::2]), weights
    return list(values), None


def load_tokenizer(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None):
    """The tokenizer of --tokenizer-type (resolved by arguments.finalize_args) and
    --tokenizer-model, or NullTokenizer's --vocab-size."""
    if tokenizer_type == "NullTokenizer":
        # Megatron-LM's: ids 0..N-1 and the end-of-document token N (vocabulary N + 1).
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        return NullTokenizer(vocab_size)
    from megatron_averis.training.arguments import TOKENIZER_LIBRARIES

    return build_tokenizer(tokenizer_model, TOKENIZER_LIBRARIES[tokenizer_type])


def dataset_config(cfg: TrainingConfig, tokenizer) -> GPTDatasetConfig:
    data = cfg.data
    common = dict(
        random_seed=cfg.execution.seed,
        sequence_length=cfg.batch.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # No explicit mask: causal attention without a mask lets SDPA pick its flash kernel.
        create_attention_mask=False,
        path_to_cache=data.data_cache_path,
        mmap_bin_files=data.mmap_bin_files,
    )
    if data.mock_data:  # megatron-core's MockGPTDataset: neither blend given
        return GPTDatasetConfig(split=data.split, **common)
    if data.data_path is not None:
        config = GPTDatasetConfig(blend=parse_blend(data.data_path), split=data.split, **common)
        # Splits that will not be read are not built: the others keep the document ranges
        # --split gives them (changing --split itself would move those ranges).
        used = (True, data.has_valid_data, data.has_test_data and data.eval_iters > 0)
        config.split_matrix = [m if u else None for m, u in zip(config.split_matrix, used)]
        return config
    # Splits that will not be read get no blend, so megatron-core does not build them.
    use_test = data.has_test_data and data.eval_iters > 0
    return GPTDatasetConfig(
        blend_per_split=[parse_blend(data.train_data_path),
                         parse_blend(data.valid_data_path) if data.has_valid_data else None,
                         parse_blend(data.test_data_path) if use_test else None],
        **common,
    )


def eval_samples(cfg: TrainingConfig) -> int:
    return cfg.data.eval_iters * cfg.batch.global_batch_size


def build_datasets(cfg: TrainingConfig, tokenizer):
    """(train, valid, test) datasets; valid/test are None when not used. Collective: rank 0
    builds megatron-core's index caches first, the others then read them."""
    data = cfg.data
    sizes = [
        cfg.batch.train_iters * cfg.batch.global_batch_size,
        eval_samples(cfg) if data.has_valid_data else None,
        eval_samples(cfg) if data.has_test_data and data.eval_iters > 0 else None,
    ]
    config = dataset_config(cfg, tokenizer)
    if data.data_path is not None or data.mock_data:
        # megatron-core wants a size for every split of a weighted blend, built or not.
        sizes = [s if s is not None else 0 for s in sizes]
    cls = MockGPTDataset if data.mock_data else GPTDataset
    datasets = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    train, valid, test = datasets
    if train is None or len(train) == 0:
        raise RuntimeError("the training split is empty; check --data-path/--split or "
                           "--train-data-path")
    return train, (valid if data.has_valid_data else None), (test if sizes[2] else None)


class MicroBatchSampler:
    """Sample indices of this data-parallel rank's micro-batches, from sample `start` on.

    Global batch g covers samples [g*G, (g+1)*G) (G = global batch size); within it, micro-batch
    step k gives data-parallel rank r the samples k*M*D + r*M ... + M (M = micro-batch, D = DP size).
    """

    def __init__(self, start: int, end: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.start, self.end = start, end
        self.micro, self.rank, self.size = micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        step = self.micro * self.size
        for first in range(self.start, self.end - step + 1, step):
            lo = first + self.rank * self.micro
            yield list(range(lo, lo + self.micro))

    def __len__(self) -> int:
        return max(0, (self.end - self.start) // (self.micro * self.size))


def _ignore_sigterm(_worker_id: int) -> None:
    """Data-loader workers outlive a SIGTERM sent to their process group (torchrun forwards one
    to each rank's group): the rank must stay fed until its exit-signal handler has saved a
    checkpoint, and a worker killed first makes the rank raise instead. Workers still exit
    with their rank."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, start: int, end: int, cfg: TrainingConfig, dp_rank: int, dp_size: int,
                pin_memory: bool, persistent: bool):
    sampler = MicroBatchSampler(start, min(end, len(dataset)), cfg.batch.micro_batch_size, dp_rank,
                                dp_size)
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0, worker_init_fn=_ignore_sigterm,
    )
