"""megatron-averis: Megatron-style LLM pretraining with FP4 GEMMs and the Averis mean split."""

__version__ = "0.1.0"
