#!/usr/bin/env python3
"""Export a megatron_averis.pretrain checkpoint to a HuggingFace model folder.

    tools/convert_to_hf.py --load runs/qwen3-0.6b-averis --out hf/qwen3-0.6b-averis [--verify]

Any tensor/pipeline layout loads merged (TP = PP = 1, see megatron_averis.diagnostics.checkpoint).
Architecture: Qwen3ForCausalLM when the model has q/k RMSNorm, else LlamaForCausalLM. Writes
config.json, generation_config.json, model.safetensors, and the sentencepiece tokenizer
(tokenizer.model, plus tokenizer.json when transformers is installed). The vocabulary keeps the
trainer's padding (rows past the tokenizer's size are the trained padding rows), so the logits are
exactly the model's. --verify runs transformers' model on a sample and compares the logits.

Weight layouts (megatron-core → HuggingFace):
  linear_qkv [groups·(q_per_group + 2)·d, h], per key/value group [its q heads, k, v]
      → q_proj [heads·d, h], k_proj [groups·d, h], v_proj [groups·d, h]
  linear_fc1 [2·ffn, h] = [gate; up] → gate_proj, up_proj;  linear_fc2 → down_proj
  linear_proj → o_proj; q/k_layernorm → q_norm/k_norm; input_layernorm → input_layernorm;
  pre_mlp_layernorm → post_attention_layernorm; final_layernorm → norm; output_layer → lm_head
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import struct
import sys

import torch

# Run from a checkout without installing: make the repository importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_averis.diagnostics import checkpoint as ckpt  # noqa: E402

SAMPLE_TEXT = ("To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind "
               "to suffer\n\tThe slings and arrows of outrageous fortune — 1601, ünïcødé.")


# --- weights ------------------------------------------------------------------------------------

def hf_family(arch: dict, requested: str = "auto") -> str:
    if requested == "auto":
        return "qwen3" if arch["qk_layernorm"] else "llama"
    if requested == "qwen3" and not arch["qk_layernorm"]:
        raise ValueError("Qwen3 has q/k RMSNorm but this model has none; export it as --arch llama")
    if requested == "llama" and arch["qk_layernorm"]:
        raise ValueError("this model has q/k RMSNorm, which Llama lacks; export it as --arch qwen3")
    return requested


def to_hf_state_dict(sd: dict, arch: dict) -> dict[str, torch.Tensor]:
    """HuggingFace names and layouts of a TP = PP = 1 GPTModel state dict."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}  # drop _extra_state
    h, d = arch["hidden_size"], arch["kv_channels"]
    heads, groups = arch["num_attention_heads"], arch["num_query_groups"]
    rep = heads // groups
    out = {"model.embed_tokens.weight": sd.pop("embedding.word_embeddings.weight"),
           "model.norm.weight": sd.pop("decoder.final_layernorm.weight")}
    if not arch["tie_embeddings"]:
        out["lm_head.weight"] = sd.pop("output_layer.weight")
    for i in range(arch["num_layers"]):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd.pop(src + "self_attention.linear_qkv.weight").view(groups, rep + 2, d, h)
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :rep].reshape(heads * d, h)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, rep].reshape(groups * d, h)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, rep + 1].reshape(groups * d, h)
        out[dst + "self_attn.o_proj.weight"] = sd.pop(src + "self_attention.linear_proj.weight")
        if arch["qk_layernorm"]:
            out[dst + "self_attn.q_norm.weight"] = sd.pop(src + "self_attention.q_layernorm.weight")
            out[dst + "self_attn.k_norm.weight"] = sd.pop(src + "self_attention.k_layernorm.weight")
        gate, up = sd.pop(src + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = sd.pop(src + "mlp.linear_fc2.weight")
        out[dst + "input_layernorm.weight"] = sd.pop(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = sd.pop(src + "pre_mlp_layernorm.weight")
    if sd:
        raise ValueError(f"weights with no HuggingFace counterpart (biases? another layer type?): "
                         f"{sorted(sd)}")
    return {k: v.contiguous() for k, v in out.items()}


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """The safetensors format: u64 little-endian header size, a JSON header of
    {name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the raw data."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} is not exported; use bf16, fp16 or fp32")
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)


# --- config and tokenizer -----------------------------------------------------------------------

def special_ids(sp_model: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    return {k: (v, sp.id_to_piece(v)) for k, v in ids.items() if v >= 0}


def hf_config(config: dict, family: str, dtype: torch.dtype, ids: dict) -> dict:
    a = config["arch"]
    common = {
        "vocab_size": config["padded_vocab_size"],
        "hidden_size": a["hidden_size"],
        "intermediate_size": a["ffn_hidden_size"],
        "num_hidden_layers": a["num_layers"],
        "num_attention_heads": a["num_attention_heads"],
        "num_key_value_heads": a["num_query_groups"],
        "head_dim": a["kv_channels"],
        "hidden_act": "silu",
        "max_position_embeddings": a["max_position_embeddings"],
        "initializer_range": a["init_method_std"],
        "rms_norm_eps": a["norm_epsilon"],
        # rope_theta for transformers 4.x, rope_parameters for 5.x.
        "rope_theta": a["rotary_base"],
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": a["rotary_base"]},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": a["tie_embeddings"],
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": ids.get("bos", (None,))[0],
        "eos_token_id": ids.get("eos", (None,))[0],
        "pad_token_id": ids.get("pad", (None,))[0],
    }
    if family == "qwen3":
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **common,
                "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": a["num_layers"]}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
            "mlp_bias": False, "pretraining_tp": 1}


def export_tokenizer(sp_model: str, out: str, max_length: int, tokenizer_json: bool) -> str:
    """tokenizer.model (+ tokenizer.json through transformers' converter, fixed to
    sentencepiece's always-added dummy prefix and checked id for id on a sample)."""
    ids = special_ids(sp_model)
    shutil.copyfile(sp_model, os.path.join(out, "tokenizer.model"))
    cfg = {"model_max_length": max_length, "add_bos_token": False, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "legacy": True,
           **{f"{k}_token": piece for k, (_, piece) in ids.items()}}
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({f"{k}_token": piece for k, (_, piece) in ids.items()}, f, indent=2)
    if not tokenizer_json:
        _write_json(os.path.join(out, "tokenizer_config.json"),
                    {"tokenizer_class": "LlamaTokenizer", **cfg})
        return "tokenizer.model only (--no-tokenizer-json)"
    try:
        from tokenizers import decoders, normalizers
        from transformers import AutoTokenizer
    except ImportError:
        _write_json(os.path.join(out, "tokenizer_config.json"),
                    {"tokenizer_class": "LlamaTokenizer", **cfg})
        return ("tokenizer.model only: transformers is not installed, so no tokenizer.json "
                "(transformers converts tokenizer.model when loading; then texts that start with "
                "whitespace tokenize differently from sentencepiece)")
    _write_json(os.path.join(out, "tokenizer_config.json"), {"tokenizer_class": "LlamaTokenizer",
                                                              **cfg})
    tok = AutoTokenizer.from_pretrained(out)
    backend = tok.backend_tokenizer
    # sentencepiece adds its dummy prefix "▁" even before a leading space; Metaspace does not.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.save(os.path.join(out, "tokenizer.json"))
    _write_json(os.path.join(out, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", **cfg})
    check_tokenizer(out, sp_model, SAMPLE_TEXT)
    return "tokenizer.model and tokenizer.json (ids equal to sentencepiece's on a sample)"


def check_tokenizer(out: str, sp_model: str, text: str) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    want = spm.SentencePieceProcessor(model_file=sp_model).encode(text)
    got = AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False)
    if got != want:
        raise RuntimeError(f"the exported tokenizer.json encodes differently from sentencepiece "
                           f"({got[:10]}... vs {want[:10]}...); export with --no-tokenizer-json")


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# --- verification -------------------------------------------------------------------------------

def compare_logits(out: str, model_config: dict, state_dict: dict, ids: torch.Tensor) -> float:
    """max |logits_hf − logits_ours| / max |logits_ours| in float32 on token ids [b, s]; both
    models run unquantized (our model under the bf16 recipe with FP32 parameters)."""
    from transformers import AutoModelForCausalLM

    ours = ckpt.build_model(model_config, recipe="bf16", bf16=False)
    ours.load_state_dict(state_dict)
    ours.eval()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        want = ours(ids, pos, None).float()
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
        got = hf(input_ids=ids).logits.float()
    return float((got - want).abs().max() / want.abs().max())


# --- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/convert_to_hf.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True,
                   help="the trainer's --save directory (latest checkpoint) or an iter_* directory")
    p.add_argument("--ckpt-step", type=int, default=None, help="this iteration, not the latest")
    p.add_argument("--out", required=True, help="HuggingFace model folder to write")
    p.add_argument("--arch", choices=("auto", "qwen3", "llama"), default="auto",
                   help="auto: qwen3 with q/k RMSNorm, else llama")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto: the checkpoint's parameter dtype")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece model (default: the run's --tokenizer-model)")
    p.add_argument("--no-tokenizer-json", action="store_true",
                   help="write tokenizer.model only, not the converted tokenizer.json")
    p.add_argument("--verify", action="store_true",
                   help="compare transformers' logits with ours (needs transformers)")
    p.add_argument("--verify-tolerance", type=float, default=1e-4,
                   help="largest accepted max|Δlogits| / max|logits|")
    return p


def convert(a) -> dict:
    with ckpt.single_process():
        info = ckpt.find(a.load, a.ckpt_step)
        cfg = info.config
        family = hf_family(cfg["arch"], a.arch)
        sp_model = a.tokenizer_model or cfg.get("tokenizer_model")
        if not sp_model or not os.path.isfile(sp_model):
            raise FileNotFoundError(f"the run's tokenizer {sp_model!r} is not there; pass "
                                    "--tokenizer-model PATH/tokenizer.model")
        if not sp_model.endswith(".model"):
            raise ValueError(f"{sp_model!r} is not a sentencepiece .model; the exporter writes "
                             "sentencepiece tokenizers only")
        model = ckpt.load_model(info, recipe="bf16")
        state = model.state_dict()
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
            a.dtype, torch.bfloat16 if cfg["bf16"] else torch.float32)
        tensors = {k: v.to(dtype) for k, v in to_hf_state_dict(state, cfg["arch"]).items()}
        os.makedirs(a.out, exist_ok=True)
        write_safetensors(os.path.join(a.out, "model.safetensors"), tensors,
                          {"source": f"megatron_averis iteration {info.iteration}"})
        ids = special_ids(sp_model)
        _write_json(os.path.join(a.out, "config.json"), hf_config(cfg, family, dtype, ids))
        _write_json(os.path.join(a.out, "generation_config.json"), {
            "bos_token_id": ids.get("bos", (None,))[0], "eos_token_id": ids.get("eos", (None,))[0],
            "pad_token_id": ids.get("pad", (None,))[0]})
        tok_note = export_tokenizer(sp_model, a.out, cfg["arch"]["max_position_embeddings"],
                                    not a.no_tokenizer_json)
        result = {"checkpoint": info.path, "iteration": info.iteration, "family": family,
                  "dtype": str(dtype), "tensors": len(tensors), "tokenizer": tok_note}
        if a.verify:
            import sentencepiece as spm

            text_ids = spm.SentencePieceProcessor(model_file=sp_model).encode(SAMPLE_TEXT)
            sample = torch.tensor([text_ids[:32]])
            exported = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v
                        for k, v in state.items()}
            err = compare_logits(a.out, cfg, exported, sample)
            result["verify_max_rel_logit_diff"] = err
            if err > a.verify_tolerance:
                raise RuntimeError(f"transformers' logits differ from ours by {err:.2e} "
                                   f"(> --verify-tolerance {a.verify_tolerance:g})")
    return result


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.verify and importlib.util.find_spec("transformers") is None:
        # Checked before anything is written: an export that cannot be verified is not wanted.
        print("convert_to_hf: --verify needs transformers, which is not installed; "
              "`pip install transformers`, or drop --verify", file=sys.stderr)
        return 2
    try:
        result = convert(a)
    except ImportError as e:
        print(f"convert_to_hf: {e}; --verify needs transformers (pip install transformers)",
              file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
