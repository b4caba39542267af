"""Diagnostics over training outputs: mean-bias statistics of linear-layer operands
(mean_bias.py), capturing those operands from a model (capture.py), loading checkpoints into one
process (checkpoint.py) and a fixed batch of the run's data (batch.py), each recipe's full-model
gradient against a BF16/FP32 reference (gradient_fidelity.py, fidelity_report.py), and reading
runs' metrics (runs.py). Command lines: tools/analyze_mean_bias.py, tools/gradient_fidelity.py,
tools/compare_runs.py."""
