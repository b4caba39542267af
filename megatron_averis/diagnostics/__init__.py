"""Diagnostics over training outputs: mean-bias statistics of linear-layer operands
(mean_bias.py), capturing those operands from a model (capture.py), and reading runs' metrics
(runs.py). Command lines: tools/analyze_mean_bias.py, tools/compare_runs.py."""
