"""Declarative FP4 training recipes: one OperandRecipe per operand of each of a linear layer's GEMMs.

A linear layer runs three GEMMs, each with two operands quantized along that GEMM's reduction
dimension:

    fprop  Y  = X · Wᵀ     operands fprop_input  (X, along features)   fprop_weight (W, along in-features)
    dgrad  dX = G · W      operands dgrad_grad   (G, along out-feat.)  dgrad_weight (W, along out-features)
    wgrad  dW = Gᵀ · X     operands wgrad_grad   (G, along tokens)     wgrad_input  (X, along tokens)

Every knob is a field; presets are just values. Two fields choose an implementation whose results
differ in the last bits (token_sum, fp4_gemm), so that a run's config records them too. `Recipe.with_overrides(["wgrad_rht=false",
"dgrad_grad.rounding=rne"])` changes single knobs and re-validates.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, replace

from megatron_averis.formats import MXFP4_BLOCK, NVFP4_BLOCK
from megatron_averis.numerics.backend import check_choice

FORMATS = ("bf16", "nvfp4", "mxfp4")
ROUNDINGS = ("rne", "stochastic")
MEAN_FORMATS = ("fp32", "bf16", "nvfp4")
OPERAND_ROLES = (
    "fprop_input",
    "fprop_weight",
    "dgrad_grad",
    "dgrad_weight",
    "wgrad_grad",
    "wgrad_input",
)
GEMMS = {"fprop": ("fprop_input", "fprop_weight"), "dgrad": ("dgrad_grad", "dgrad_weight"),
         "wgrad": ("wgrad_grad", "wgrad_input")}
WEIGHT_ROLES = ("fprop_weight", "dgrad_weight")
BLOCK_SIZE = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK, "bf16": 1}


class RecipeError(ValueError):
    """An invalid recipe or a shape the recipe cannot quantize."""


@dataclass(frozen=True)
class OperandRecipe:
    """How one GEMM operand is quantized.

    format:      bf16 (not quantized), nvfp4 (1x16 E4M3 blocks + FP32 tensor scale), mxfp4 (1x32 E8M0)
    block_2d:    16x16 NVFP4 blocks (weights only) so that W and Wᵀ share one quantization
    rounding:    rne | stochastic
    mean_split:  Averis: quantize R = X - 1μᵀ and carry μ (the mean over tokens) separately
    mean_format: precision of μ: fp32 | bf16 | nvfp4. Default bf16: μ is one vector per GEMM
                 operand, so its cost is negligible, and BF16's relative error (2^-9) is far below
                 FP4's, while keeping the rank-one correction a cheap BF16-operand GEMV.
    """

    format: str = "bf16"
    block_2d: bool = False
    rounding: str = "rne"
    mean_split: bool = False
    mean_format: str = "bf16"

    @property
    def quantized(self) -> bool:
        return self.format != "bf16"

    @property
    def block(self) -> tuple[int, int]:
        """(rows, cols) of one scale block, cols along the reduction dimension."""
        k = BLOCK_SIZE[self.format]
        return (k, k) if self.block_2d else (1, k)


BF16_OPERAND = OperandRecipe()


@dataclass(frozen=True)
class Recipe:
    """A full low-precision recipe for the linear layers of a transformer.

    fprop_rht / dgrad_rht / wgrad_rht: random Hadamard transform (16-blocks, seeded signs) applied
    to both operands of that GEMM along its reduction dimension; needs both operands in FP4.
    rht_seed: seed of the RHT sign vector (the same on every rank and layer).
    sr_seed: base seed of the position-keyed stochastic-rounding stream.
    bf16_first_layers / bf16_last_layers: transformer layers kept entirely in BF16 at each end
    (Megatron-LM's --first-last-layers-bf16 with --num-layers-at-start/end-in-bf16).
    quantize_once: quantize X, W and G once each, along their last dimension, and reuse X̂, Ŵ, Ĝ
    in all three GEMMs (the Averis authors' code: X̂ = μ + Q(X - 1μᵀ)). Emulation only: dgrad and
    wgrad then reduce across the blocks, which FP4 tensor cores cannot consume. Needs each
    tensor's two operand recipes equal and no RHT.
    token_sum: order of the token sums behind every Averis mean: pairwise (the default: a
    specified tree order, the same on every device; on the GPU one stats kernel also yields the
    residual's range, so the mean costs no extra read of the operand) or torch (torch.sum, in
    the device's and the library's order; the default before 2026-12). They differ in the means'
    last bits.
    fp4_gemm: dequant (BF16 scaled values, cuBLAS with FP32 accumulation; the default) or fused
    (a Triton GEMM dequantizing packed FP4 in its prologue, where the kernels run; FP32 sums in
    another order, so other last bits).
    """

    name: str = "bf16"
    fprop_input: OperandRecipe = BF16_OPERAND
    fprop_weight: OperandRecipe = BF16_OPERAND
    dgrad_grad: OperandRecipe = BF16_OPERAND
    dgrad_weight: OperandRecipe = BF16_OPERAND
    wgrad_grad: OperandRecipe = BF16_OPERAND
    wgrad_input: OperandRecipe = BF16_OPERAND
    fprop_rht: bool = False
    dgrad_rht: bool = False
    wgrad_rht: bool = False
    rht_seed: int = 0
    sr_seed: int = 1234
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0
    quantize_once: bool = False
    token_sum: str = "pairwise"
    fp4_gemm: str = "dequant"

    def __post_init__(self):
        validate(self)

    def operand(self, role: str) -> OperandRecipe:
        return getattr(self, role)

    def rht(self, gemm: str) -> bool:
        return getattr(self, f"{gemm}_rht")

    @property
    def is_bf16(self) -> bool:
        """True when no operand is quantized: the linear layer is exactly F.linear."""
        return not any(self.operand(r).quantized for r in OPERAND_ROLES)

    @property
    def shares_weight_quantization(self) -> bool:
        """fprop and dgrad can reuse one 2-D quantization of W (transposed for dgrad)."""
        f, d = self.fprop_weight, self.dgrad_weight
        return f == d and f.quantized and f.block_2d

    def reduction_multiple(self, gemm: str) -> int:
        """The reduction dimension of `gemm` must be a multiple of this."""
        m = 1
        for role in GEMMS[gemm]:
            m = max(m, self.operand(role).block[1])
        return m

    def row_multiple(self, role: str) -> int:
        """The non-reduction dimension of operand `role` must be a multiple of this (2-D blocks)."""
        return self.operand(role).block[0]

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "Recipe":
        return apply_overrides(self, overrides)

    def describe(self) -> str:
        """One line per GEMM, for logs."""
        lines = [f"recipe {self.name}"]
        for gemm, roles in GEMMS.items():
            parts = []
            for role in roles:
                o = self.operand(role)
                s = o.format + (" 16x16" if o.block_2d else "")
                if o.quantized:
                    s += f" {o.rounding}" + (f" mean-split({o.mean_format})" if o.mean_split else "")
                parts.append(f"{role}={s}")
            lines.append(f"  {gemm}: " + ", ".join(parts) + (" +RHT" if self.rht(gemm) else ""))
        if self.quantize_once:
            lines.append("  each tensor quantized once, reused by all three GEMMs (emulation only)")
        if self.bf16_first_layers or self.bf16_last_layers:
            lines.append(f"  bf16 layers: first {self.bf16_first_layers}, last {self.bf16_last_layers}")
        lines.append(f"  token sums: {self.token_sum}, FP4 GEMM: {self.fp4_gemm}")
        return "\n".join(lines)


def validate(r: Recipe) -> None:
    for role in OPERAND_ROLES:
        o = r.operand(role)
        where = f"recipe {r.name!r}: {role}"
        if not isinstance(o, OperandRecipe):
            raise RecipeError(f"{where} must be an OperandRecipe, got {type(o).__name__}")
        if o.format not in FORMATS:
            raise RecipeError(f"{where}.format={o.format!r} is unknown; choose one of {FORMATS}")
        if o.rounding not in ROUNDINGS:
            raise RecipeError(f"{where}.rounding={o.rounding!r} is unknown; choose one of {ROUNDINGS}")
        if o.mean_format not in MEAN_FORMATS:
            raise RecipeError(
                f"{where}.mean_format={o.mean_format!r} is unknown; choose one of {MEAN_FORMATS}"
            )
        if not o.quantized and (o.block_2d or o.rounding != "rne" or o.mean_split):
            raise RecipeError(
                f"{where} is bf16, so block_2d / stochastic rounding / mean_split do not apply; "
                "set its format to nvfp4 or mxfp4, or drop those options"
            )
        if o.block_2d and o.format != "nvfp4":
            raise RecipeError(f"{where}: 16x16 blocks exist only for nvfp4; set block_2d=false")
        if o.block_2d and role not in WEIGHT_ROLES:
            raise RecipeError(
                f"{where}: 2-D blocks are for weights (reused transposed); activations and "
                "gradients use 1x16 blocks along the reduction dimension; set block_2d=false"
            )
        if o.mean_split and role in WEIGHT_ROLES:
            raise RecipeError(
                f"{where}: the mean split is over tokens, which weights do not have; "
                "use mean_split on inputs and gradients only"
            )
    for gemm, roles in GEMMS.items():
        if r.rht(gemm) and not all(r.operand(x).quantized for x in roles):
            raise RecipeError(
                f"recipe {r.name!r}: {gemm}_rht needs both {roles[0]} and {roles[1]} in FP4 "
                "(the transform only pays off against quantization error); disable it or quantize both"
            )
    if r.quantize_once:
        for a, b in (("fprop_input", "wgrad_input"), ("dgrad_grad", "wgrad_grad"),
                     ("fprop_weight", "dgrad_weight")):
            if r.operand(a) != r.operand(b):
                raise RecipeError(
                    f"recipe {r.name!r}: quantize_once reuses one quantization of each tensor, so "
                    f"{a} and {b} must be equal; make them equal or set quantize_once=false")
        if any(r.rht(g) for g in GEMMS):
            raise RecipeError(f"recipe {r.name!r}: quantize_once reuses operands across GEMMs with "
                              "different reduction dimensions, so no GEMM can be rotated; disable the RHT")
    for fld in ("token_sum", "fp4_gemm"):
        try:
            check_choice(fld, getattr(r, fld))
        except ValueError as e:
            raise RecipeError(f"recipe {r.name!r}: {e}") from None
    if r.bf16_first_layers < 0 or r.bf16_last_layers < 0:
        raise RecipeError(f"recipe {r.name!r}: bf16_first_layers/bf16_last_layers must be >= 0")


def _fp4(fmt: str = "nvfp4", **kw) -> OperandRecipe:
    return OperandRecipe(format=fmt, **kw)


def _nvidia(name: str, rht: bool, mean_split: bool) -> Recipe:
    """NVIDIA's NVFP4 pretraining recipe (2-D weights, SR on gradients), optionally with Averis."""
    w = _fp4(block_2d=True)
    act = _fp4(mean_split=mean_split)
    grad = _fp4(rounding="stochastic", mean_split=mean_split)
    return Recipe(
        name=name,
        fprop_input=act,
        fprop_weight=w,
        dgrad_grad=grad,
        dgrad_weight=w,
        wgrad_grad=grad,
        wgrad_input=act,
        wgrad_rht=rht,
    )


def _averis_paper() -> Recipe:
    """The Averis authors' numerics: each tensor quantized once (1x16 along features, RNE for X and
    W, SR for G), μ in FP32, the quantized tensors reused by fprop, dgrad and wgrad; no RHT."""
    x = _fp4(mean_split=True, mean_format="fp32")
    w = _fp4()
    g = _fp4(rounding="stochastic", mean_split=True, mean_format="fp32")
    return Recipe(name="averis-paper", fprop_input=x, wgrad_input=x, fprop_weight=w,
                  dgrad_weight=w, dgrad_grad=g, wgrad_grad=g, quantize_once=True)


def _uniform(name: str, fmt: str) -> Recipe:
    o = _fp4(fmt)
    return Recipe(name=name, **{role: o for role in OPERAND_ROLES})


# Names follow Megatron-LM and Transformer Engine: `nvfp4` is NVIDIA's pretraining recipe.
# `nvfp4-nohadamard` is the same without the RHT, the control that isolates `averis`'s split.
PRESETS = {
    "bf16": lambda: Recipe(name="bf16"),
    "nvfp4": lambda: _nvidia("nvfp4", rht=True, mean_split=False),
    "nvfp4-nohadamard": lambda: _nvidia("nvfp4-nohadamard", rht=False, mean_split=False),
    "nvfp4-plain": lambda: _uniform("nvfp4-plain", "nvfp4"),
    "averis": lambda: _nvidia("averis", rht=False, mean_split=True),
    "averis-rht": lambda: _nvidia("averis-rht", rht=True, mean_split=True),
    "averis-paper": _averis_paper,
    "mxfp4": lambda: _uniform("mxfp4", "mxfp4"),
}

# Old preset names that still resolve, with a deprecation line naming the new one.
DEPRECATED_NAMES = {"nvfp4-rht": "nvfp4"}


def canonical_name(name: str) -> str:
    """The preset `name` stands for; a deprecated name warns once per call with its successor."""
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(f"recipe {name!r} is deprecated and now called {new!r}; use --fp4-recipe {new}",
                      FutureWarning, stacklevel=3)
        return new
    if name not in PRESETS:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {sorted(PRESETS)}")
    return name


def get_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    return PRESETS[canonical_name(name)]().with_overrides(overrides)


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise RecipeError(f"expected true/false, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise RecipeError(f"expected an integer, got {text!r}") from None
    return text


def apply_overrides(recipe: Recipe, overrides) -> Recipe:
    """Apply "key=value" overrides. Keys: a Recipe field (wgrad_rht=true), a role's field
    (dgrad_grad.rounding=rne), or a field for every operand of a kind: inputs.*, grads.*, weights.*
    (e.g. grads.mean_split=false)."""
    groups = {
        "inputs": ("fprop_input", "wgrad_input"),
        "grads": ("dgrad_grad", "wgrad_grad"),
        "weights": WEIGHT_ROLES,
    }
    top = {f.name for f in dataclasses.fields(Recipe)} - set(OPERAND_ROLES)
    operand_fields = {f.name for f in dataclasses.fields(OperandRecipe)}
    changes: dict = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"recipe override {item!r} must look like key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if "." in key:
            target, fld = key.split(".", 1)
            roles = groups.get(target, (target,))
            if any(role not in OPERAND_ROLES for role in roles) or fld not in operand_fields:
                raise RecipeError(
                    f"unknown recipe override key {key!r}; use <role>.<field> with role in "
                    f"{OPERAND_ROLES + tuple(groups)} and field in {sorted(operand_fields)}"
                )
            for role in roles:
                base = changes.get(role, recipe.operand(role))
                try:
                    v = _parse_value(value, getattr(base, fld))
                except RecipeError as e:
                    raise RecipeError(f"recipe override {item!r}: {e}") from None
                changes[role] = replace(base, **{fld: v})
        elif key in top:
            try:
                changes[key] = _parse_value(value, getattr(recipe, key))
            except RecipeError as e:
                raise RecipeError(f"recipe override {item!r}: {e}") from None
        else:
            raise RecipeError(
                f"unknown recipe override key {key!r}; top-level keys are {sorted(top)}, "
                f"operand keys look like fprop_input.rounding"
            )
    return replace(recipe, **changes) if changes else recipe


def check_linear_shape(recipe: Recipe, in_features: int, out_features: int, where: str = "linear") -> None:
    """Feature dimensions must split into whole quantization blocks (raise at layer build)."""
    for gemm, dim, name in (("fprop", in_features, "in_features"), ("dgrad", out_features, "out_features")):
        m = recipe.reduction_multiple(gemm)
        if dim % m:
            raise RecipeError(
                f"{where}: {name}={dim} is the reduction dimension of {gemm} and must be a multiple "
                f"of {m} under recipe {recipe.name!r}; pick a size divisible by {m} or keep this layer BF16"
            )
    for role, dim, name in (("fprop_weight", out_features, "out_features"),
                            ("dgrad_weight", in_features, "in_features")):
        m = recipe.row_multiple(role)
        if dim % m:
            raise RecipeError(
                f"{where}: {name}={dim} must be a multiple of {m} for {role}'s 16x16 blocks under "
                f"recipe {recipe.name!r}; set {role}.block_2d=false or change the size"
            )
    if (recipe.rht("fprop") and in_features % 16) or (recipe.rht("dgrad") and out_features % 16):
        raise RecipeError(f"{where}: the Hadamard transform needs reduction dimensions divisible by 16")


def wgrad_token_multiple(recipe: Recipe) -> int:
    """wgrad reduces over tokens: its operands' blocks (and RHT) run along tokens in this many."""
    m = recipe.reduction_multiple("wgrad")
    return max(m, 16) if recipe.rht("wgrad") else m


def check_token_count(recipe: Recipe, tokens: int, where: str = "linear") -> None:
    """wgrad reduces over tokens: the token count must split into whole blocks."""
    m = wgrad_token_multiple(recipe)
    if tokens % m:
        raise RecipeError(
            f"{where}: {tokens} tokens per GEMM is not a multiple of {m}, the wgrad block along tokens "
            f"under recipe {recipe.name!r}; make micro-batch x sequence length (per rank) a multiple of {m}"
        )


__all__ = [
    "OperandRecipe",
    "Recipe",
    "RecipeError",
    "PRESETS",
    "DEPRECATED_NAMES",
    "canonical_name",
    "OPERAND_ROLES",
    "GEMMS",
    "get_recipe",
    "apply_overrides",
    "check_linear_shape",
    "check_token_count",
    "wgrad_token_multiple",
]
