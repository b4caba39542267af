"""CustomRecipe quantizer factories: our recipes as Transformer Engine quantizers.

    from transformer_engine.common.recipe import CustomRecipe
    recipe = CustomRecipe(qfactory=megatron_averis.te.factories.averis)

or, in Megatron-LM, `--fp4-format e2m1 --fp4-recipe custom --fp4-quantizer-factory
megatron_averis.te.factories.averis` (any preset name below). Each factory maps a TE quantizer
role to a quantizer of our recipe (roles.py): linear inputs and output gradients get the
Averis mean split (per the preset), weights NVFP4 16x16; every other slot stays in high
precision (TE's IdentityQuantizer). The presets are derived from megatron_averis.recipes.

This module imports without TE; TE is imported when a factory is first called.
"""

from __future__ import annotations

from megatron_averis.recipes import Recipe, RecipeError, get_recipe
from megatron_averis.te.availability import require_te
from megatron_averis.te.binding import LayerRegistry, find_calling_module
from megatron_averis.te.roles import slot_spec

TE_PRESETS = ("averis", "averis-rht", "nvfp4", "nvfp4-nohadamard", "nvfp4-plain")


def check_te_recipe(recipe: Recipe) -> None:
    """TE quantizes each tensor per usage (row- and column-wise), so recipes that reuse one
    quantization across GEMMs cannot run through it."""
    if recipe.quantize_once:
        raise RecipeError(f"recipe {recipe.name!r} reuses one quantization of each tensor in all "
                          "three GEMMs (emulation only); run it with --transformer-impl local")


class QFactory:
    """qfactory(role) -> quantizer for one recipe; callable as TE's CustomRecipe expects.

    first_stream: stochastic-rounding stream id of the first layer it serves (later layers
    count up in the order TE first runs them), to line up with QuantizedLinear(stream_id=...).
    """

    def __init__(self, recipe: Recipe | str, first_stream: int = 0):
        self.recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        check_te_recipe(self.recipe)
        self.layers = LayerRegistry(self.recipe, first_stream)

    def spec(self, role):
        return slot_spec(role)

    def __call__(self, role):
        require_te("the Averis CustomRecipe")
        spec = slot_spec(role)
        if spec.kind is None or self.recipe.is_bf16:
            from transformer_engine.pytorch.tensor.identity_tensor import IdentityQuantizer

            return IdentityQuantizer()
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

        from megatron_averis.te.quantizer import AverisQuantizer

        module = find_calling_module(TransformerEngineBaseModule)
        return AverisQuantizer(spec.kind, self.layers.state_for(module, spec.kind))

    def __repr__(self):
        return f"QFactory({self.recipe.name})"


def custom_recipe(recipe: Recipe | str, first_stream: int = 0):
    """A TE CustomRecipe running `recipe` (a preset name or a Recipe with overrides)."""
    require_te("the Averis CustomRecipe")
    from transformer_engine.common.recipe import CustomRecipe

    return CustomRecipe(qfactory=QFactory(recipe, first_stream))


# Module-level factories for Megatron-LM's --fp4-quantizer-factory (a Python path string).
averis = QFactory("averis")
averis_rht = QFactory("averis-rht")
nvfp4 = QFactory("nvfp4")
nvfp4_nohadamard = QFactory("nvfp4-nohadamard")
nvfp4_plain = QFactory("nvfp4-plain")
nvfp4_rht = nvfp4  # deprecated name of NVIDIA's recipe, kept so old --fp4-quantizer-factory paths work
PRESET_FACTORIES = {"averis": averis, "averis-rht": averis_rht, "nvfp4": nvfp4,
                    "nvfp4-nohadamard": nvfp4_nohadamard, "nvfp4-plain": nvfp4_plain}


class _Configured:
    """The recipe the trainer selected (preset plus overrides), set once per process with
    `configure(recipe)`; `--fp4-quantizer-factory megatron_averis.te.factories.configured`."""

    def __init__(self):
        self.factory: QFactory | None = None

    def configure(self, recipe: Recipe) -> None:
        if self.factory is None or self.factory.recipe != recipe:
            self.factory = QFactory(recipe)

    def __call__(self, role):
        if self.factory is None:
            raise RuntimeError("megatron_averis.te.factories.configured has no recipe; call "
                               "megatron_averis.te.factories.configure(recipe) first, or use a "
                               f"preset factory ({', '.join(n.replace('-', '_') for n in TE_PRESETS)})")
        return self.factory(role)


configured = _Configured()
configure = configured.configure


def resolve(path: str) -> QFactory:
    """The factory at `path` (Megatron-LM's --fp4-quantizer-factory), resolved the way
    megatron-core resolves it when it builds the CustomRecipe; ValueError unless it is one of
    ours with a fixed recipe (the trainer needs the recipe for its start-up checks)."""
    from megatron.core.fp8_utils import _resolve_callable_from_python_import_path

    factory = _resolve_callable_from_python_import_path(path)
    if not isinstance(factory, QFactory):
        names = ", ".join(f"{__name__}.{n.replace('-', '_')}" for n in TE_PRESETS)
        raise ValueError(f"{path} is not a megatron-averis quantizer factory; this program runs "
                         f"one of {names} (other factories: use Megatron-LM's pretrain_gpt.py)")
    return factory
