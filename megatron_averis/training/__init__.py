"""The pretraining program behind `python -m megatron_averis.pretrain`.

    arguments.py        flags (Megatron-LM names), presets and recipe resolution, start-up checks
    presets.py          model architectures, parameter counts, FLOPs per step
    distributed.py      process group and megatron-core parallel state from torchrun's environment
    cpu_compat.py       lets megatron-core's DDP/optimizer/schedules run without CUDA (CI only)
    model.py            TransformerConfig and this stage's GPTModel (megatron_averis.megatron spec)
    optim.py            DDP, megatron optimizer, LR schedule
    data.py             GPTDataset/BlendedMegatronDatasetBuilder, resumable micro-batch sampler
    rng_state.py        seeding; capture/restore of every RNG stream
    checkpoint_dirs.py  checkpoint layout, atomic commit, `latest` tracker
    checkpointing.py    dist_checkpointing save/load of the complete training state
    checkpoint_integrity.py  per-checkpoint manifest (sizes, SHA-256), verification, write failures
    preflight.py        start-up checks: dataset files, --load, writable --save with room
    divergence.py       NaN/spike guard between the gradient norm and the update: abort or skip
    metrics.py          throughput, TFLOP/s, MFU, memory, progress line
    writers.py          metrics.jsonl, TensorBoard, wandb
    loop.py             the training loop, validation, main()
"""
