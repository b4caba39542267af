"""tools/convert_to_hf.py: the weight mapping against an independent slicing of megatron-core's
layouts, the safetensors writer against the format, and (when transformers is installed)
transformers' logits and tokenizer against ours, on a real trainer checkpoint and on a tiny
Llama-shaped model."""

import importlib.util
import json
import os
import struct
import sys

import numpy as np
import pytest
import torch

from megatron_averis.diagnostics import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(ROOT, "tools", "convert_to_hf.py"))
c2h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(c2h)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
LLAMA_ARCH = {"ffn_hidden_size": 96, "hidden_size": 64, "init_method_std": 0.02, "kv_channels": 16,
              "max_position_embeddings": 256, "norm_epsilon": 1e-5, "num_attention_heads": 4,
              "num_layers": 2, "num_query_groups": 1, "qk_layernorm": False,
              "rotary_base": 500_000.0, "tie_embeddings": False}


def read_safetensors(path):
    """Parse the file by the format's definition (independent of the writer's code)."""
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0
    meta = header.pop("__metadata__")
    out, end = {}, 0
    for name, h in header.items():
        a, b = h["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        out[name] = torch.frombuffer(buf, dtype=torch.uint8).view(dtypes[h["dtype"]]).view(h["shape"])
        end = max(end, b)
    assert 8 + n + end == len(raw)
    return out, meta


def expected_hf(sd, arch):
    """HuggingFace tensors by head: q head j of key/value group g = j // rep sits at rows
    [(g·(rep + 2) + j % rep)·d, +d) of linear_qkv, k of group g at (g·(rep + 2) + rep)·d, v next."""
    d, heads, groups = arch["kv_channels"], arch["num_attention_heads"], arch["num_query_groups"]
    rep, ffn = heads // groups, arch["ffn_hidden_size"]
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if not arch["tie_embeddings"]:
        out["lm_head.weight"] = sd["output_layer.weight"]
    for i in range(arch["num_layers"]):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd[p + "self_attention.linear_qkv.weight"]
        rows = lambda start: qkv[start * d:(start + 1) * d]  # noqa: E731
        out[q + "self_attn.q_proj.weight"] = torch.cat(
            [rows((j // rep) * (rep + 2) + j % rep) for j in range(heads)])
        out[q + "self_attn.k_proj.weight"] = torch.cat([rows(g * (rep + 2) + rep) for g in range(groups)])
        out[q + "self_attn.v_proj.weight"] = torch.cat([rows(g * (rep + 2) + rep + 1) for g in range(groups)])
        out[q + "self_attn.o_proj.weight"] = sd[p + "self_attention.linear_proj.weight"]
        fc1 = sd[p + "mlp.linear_fc1.weight"]
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = fc1[:ffn], fc1[ffn:]
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.linear_fc2.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "pre_mlp_layernorm.weight"]
        if arch["qk_layernorm"]:
            out[q + "self_attn.q_norm.weight"] = sd[p + "self_attention.q_layernorm.weight"]
            out[q + "self_attn.k_norm.weight"] = sd[p + "self_attention.k_layernorm.weight"]
    return out


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "tiny-averis")
    argv = ["--load", tiny_runs["averis"], "--out", out] + (["--verify"] if HAS_TRANSFORMERS else [])
    assert c2h.main(argv) == 0
    with ckpt.single_process():
        info = ckpt.find(tiny_runs["averis"])
        sd = ckpt.load_model(info, recipe="bf16").state_dict()
    return out, info, sd


def test_checkpoint_export_files_and_weights(exported):
    out, info, sd = exported
    assert info.iteration == 4
    tensors, meta = read_safetensors(os.path.join(out, "model.safetensors"))
    assert meta == {"format": "pt", "source": "megatron_averis iteration 4"}
    want = expected_hf(sd, info.config["arch"])
    assert set(tensors) == set(want)
    for k, v in want.items():
        assert tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], v), k
    cfg = json.load(open(os.path.join(out, "config.json")))
    a = info.config["arch"]
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["vocab_size"], cfg["head_dim"], cfg["num_key_value_heads"], cfg["rope_theta"]) == (
        info.config["padded_vocab_size"], a["kv_channels"], a["num_query_groups"], a["rotary_base"])
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_transformers_reproduces_our_logits_and_tokens(exported, tiny_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import sentencepiece as spm

    out, info, sd = exported
    texts = ["To be, or not to be", "  two spaces\n\tand a tab, 12345 ünïcødé", " lead", "", "a\n\nb  c"]
    sp = spm.SentencePieceProcessor(model_file=tiny_corpus["tokenizer_model"])
    tok = AutoTokenizer.from_pretrained(out)
    for t in texts:
        assert tok.encode(t, add_special_tokens=False) == sp.encode(t), repr(t)
        assert tok.decode(sp.encode(t)) == t
    ids = torch.tensor([sp.encode("Whether 'tis nobler in the mind to suffer the slings")[:24]])
    with ckpt.single_process():
        ours = ckpt.build_model(info.config, recipe="bf16", bf16=False)
        ours.load_state_dict(sd)
        with torch.no_grad():
            want = ours.eval()(ids, torch.arange(ids.shape[1])[None], None)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    np.testing.assert_array_equal(got.argmax(-1).numpy(), want.argmax(-1).numpy())


def test_llama_export_without_checkpoint(tmp_path):
    """An untied, q/k-norm-free model with one key/value group maps to LlamaForCausalLM."""
    config = {"arch": LLAMA_ARCH, "bf16": True, "padded_vocab_size": 128, "recipe": {"name": "bf16"}}
    with ckpt.single_process():
        torch.manual_seed(3)
        model = ckpt.build_model(config, recipe="bf16")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layernorm" in n:
                    p.add_(0.3 * torch.randn_like(p))  # non-trivial norm weights
        sd = model.state_dict()
        tensors = c2h.to_hf_state_dict(sd, LLAMA_ARCH)
        want = expected_hf(sd, LLAMA_ARCH)
        assert set(tensors) == set(want) and all(torch.equal(tensors[k], want[k]) for k in want)
        c2h.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
        hf_cfg = c2h.hf_config(config, c2h.hf_family(LLAMA_ARCH), torch.bfloat16, {})
        assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
        (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
        if HAS_TRANSFORMERS:
            ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
            assert c2h.compare_logits(str(tmp_path), config, sd, ids) < 1e-5
    back, _ = read_safetensors(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_errors(exported, tiny_runs, tmp_path, capsys):
    assert c2h.main(["--load", tiny_runs["averis"], "--out", str(tmp_path / "x"),
                     "--arch", "llama"]) == 2
    assert "export it as --arch qwen3" in capsys.readouterr().err
    assert c2h.main(["--load", tiny_runs["averis"], "--out", str(tmp_path / "x"),
                     "--tokenizer-model", str(tmp_path / "gone.model")]) == 2
    assert "pass --tokenizer-model" in capsys.readouterr().err
    assert c2h.main(["--load", tiny_runs["bf16"], "--out", str(tmp_path / "x")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no HuggingFace counterpart"):
        c2h.to_hf_state_dict({**exported[2], "decoder.layers.0.mlp.linear_fc1.bias": torch.zeros(2)},
                             exported[1].config["arch"])


def test_verify_without_transformers_fails_before_writing(tiny_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # not importable
    out = tmp_path / "hf"
    assert c2h.main(["--load", tiny_runs["averis"], "--out", str(out), "--verify"]) == 2
    assert ("--verify needs transformers, which is not installed; `pip install transformers`, or "
            "drop --verify") in capsys.readouterr().err
    assert not out.exists()


def test_tokenizer_export_without_transformers(monkeypatch, tmp_path, tiny_corpus):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    note = c2h.export_tokenizer(tiny_corpus["tokenizer_model"], str(tmp_path), 256, True)
    assert "transformers is not installed, so no tokenizer.json" in note
    assert not (tmp_path / "tokenizer.json").exists()
    cfg = json.load(open(tmp_path / "tokenizer_config.json"))
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["add_bos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<s>", "</s>", "<pad>", "<unk>")
    assert open(tmp_path / "tokenizer.model", "rb").read() == open(
        tiny_corpus["tokenizer_model"], "rb").read()
