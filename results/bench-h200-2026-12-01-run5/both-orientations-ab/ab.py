"""A/B of quantize_both in the whole step: AB_OFF=1 makes the backend refuse the one-pass kernel."""
import os, runpy, sys
sys.modules["transformer_engine"] = None  # as benchmarks/without_te.py
if os.environ.get("AB_OFF"):
    from megatron_averis.numerics import backend
    backend.both_orientations_kernels = lambda x: None
sys.argv = ["benchmarks/model_step.py", *sys.argv[1:]]
sys.path[0] = os.path.abspath("benchmarks")
runpy.run_path("benchmarks/model_step.py", run_name="__main__")
