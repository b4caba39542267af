"""Which of a linear layer's GEMM operands a Transformer Engine quantizer role produces.

TE asks a CustomRecipe's qfactory for one quantizer per tensor slot, naming the slot with a
QuantizerRole(module_type, tensor_type, name). A TE quantizer produces two usages of its tensor:
"rowwise" (blocks along the last dimension) and "columnwise" (blocks along the first, i.e. of the
transpose). In our recipe's vocabulary (recipes.py):

    tensor_type   rowwise operand            columnwise operand
    input         fprop_input   X  [T, K]    wgrad_input  Xᵀ [K, T]
    weight        fprop_weight  W  [N, K]    dgrad_weight Wᵀ [K, N]
    grad_output   dgrad_grad    G  [T, N]    wgrad_grad   Gᵀ [N, T]

Everything else (a GEMM output, grad_input, attention slots, roles TE leaves empty) is not a GEMM
operand of the recipe and stays in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_averis.linear.operands import TENSOR_ROLES

LINEAR_MODULES = ("linear",)
UNSUPPORTED_MODULES = ("grouped_linear",)
KINDS = TENSOR_ROLES  # TE's tensor types are the linear layer's tensor names


@dataclass(frozen=True)
class SlotSpec:
    """What one TE quantizer slot becomes: `kind` is a key of KINDS, or None (high precision)."""

    kind: str | None
    module_type: str = ""
    name: str = ""

    @property
    def operand_roles(self) -> tuple[str, str] | None:
        return KINDS.get(self.kind)


def slot_spec(role) -> SlotSpec:
    """Map a TE QuantizerRole (or None, which TE passes for unknown consumers) to a SlotSpec."""
    module_type = getattr(role, "module_type", "") or ""
    tensor_type = getattr(role, "tensor_type", "") or ""
    name = getattr(role, "name", "") or ""
    if module_type in UNSUPPORTED_MODULES:
        raise ValueError(f"the Averis TE recipe covers Linear/LayerNormLinear GEMMs, not "
                         f"{module_type} (MoE grouped GEMMs); got role {role}")
    if module_type in LINEAR_MODULES and tensor_type in KINDS:
        return SlotSpec(tensor_type, module_type, name)
    return SlotSpec(None, module_type, name)
