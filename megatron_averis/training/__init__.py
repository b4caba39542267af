"""The pretraining program behind `python -m megatron_averis.pretrain`.

    arguments.py        flags (Megatron-LM names), presets and recipe resolution, start-up checks
    megatron_flags.py   Megatron-LM's flags beyond ours: architecture values, refusals, no-ops
    config.py           TrainingConfig (with ModelConfig): the typed configuration a run is built from
    presets.py          model architectures, parameter counts, FLOPs per step
    distributed.py      process group and megatron-core parallel state from torchrun's environment
    cpu_compat.py       lets megatron-core's DDP/optimizer/schedules run without CUDA (CI only)
    model.py            TransformerConfig and this stage's GPTModel from a ModelConfig
    optim.py            DDP, megatron optimizer, LR schedule
    data.py             GPTDataset/BlendedMegatronDatasetBuilder, resumable micro-batch sampler
    rng_state.py        seeding; capture/restore of every RNG stream
    checkpoint_dirs.py  Megatron-LM's checkpoint layout, atomic commit, the tracker file
    checkpointing.py    dist_checkpointing save/load of the complete training state; Megatron-LM's
                        checkpoints in and out
    checkpoint_integrity.py  per-checkpoint manifest (sizes, SHA-256), verification, write failures
    preflight.py        start-up checks: dataset files, --load, writable --save with room
    divergence.py       NaN/spike guard between the gradient norm and the update: abort or skip
    metrics.py          throughput, TFLOP/s, MFU, memory, progress line
    writers.py          metrics.jsonl, TensorBoard, wandb
    loop.py             the training loop, validation, main()
"""
