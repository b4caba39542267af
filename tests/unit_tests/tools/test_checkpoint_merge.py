"""Checkpoints saved under TP=2 or PP=2 (two gloo processes) load merged into one process."""

import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import merge_cases  # noqa: E402
from tp_harness import run_world  # noqa: E402

from megatron_averis.diagnostics import checkpoint as ckpt  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    dirs = {k: str(tmp_path_factory.mktemp(k)) for k in ("tp2", "pp2")}
    ranks = run_world(2, merge_cases.save_layouts, dirs)
    return {k: (dirs[k], [r[k] for r in ranks]) for k in dirs}


def _merged(path):
    with ckpt.single_process():
        info = ckpt.find(path)
        assert info.iteration == 7 and info.config == merge_cases.CONFIG
        return {k: v for k, v in ckpt.load_model(info).state_dict().items()
                if isinstance(v, torch.Tensor)}


def test_tp2_checkpoint_merges_to_the_unsplit_weights(saved):
    out, ranks = saved["tp2"]
    merged = _merged(out)
    # Column-parallel weights are split along rows, row-parallel ones along columns; the
    # embedding along the vocabulary; norms are replicated.
    for name, full in merged.items():
        parts = [r["state"][name] for r in sorted(ranks, key=lambda r: r["tp_rank"])]
        if parts[0].shape == full.shape:
            assert all(torch.equal(p, full) for p in parts), name
            continue
        dim = 1 if "linear_proj" in name or "linear_fc2" in name else 0
        if "linear_fc1" in name:  # [gate; up], each split over ranks: rank r holds gate_r; up_r
            gate = torch.cat([p.chunk(2)[0] for p in parts])
            up = torch.cat([p.chunk(2)[1] for p in parts])
            assert torch.equal(torch.cat([gate, up]), full), name
        else:
            assert torch.equal(torch.cat(parts, dim), full), name


def test_pp2_checkpoint_merges_the_stages(saved):
    out, ranks = saved["pp2"]
    merged = _merged(out)
    expected = {}
    for r in ranks:
        for name, t in r["state"].items():
            m = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
            if m:
                name = f"decoder.layers.{int(m.group(1)) + r['offset']}.{m.group(2)}"
            if name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            expected[name] = t
    assert set(merged) == set(expected)
    for name, t in expected.items():
        assert torch.equal(merged[name], t), name
