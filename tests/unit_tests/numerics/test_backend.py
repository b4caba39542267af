"""The structure around the kernels: kernels/ never imports numerics, numerics.backend alone
picks kernel or reference, and the result-changing choices (token_sum, fp4_gemm) reach the
numerics through the recipe, not through environment variables."""

import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import megatron_averis
from megatron_averis.linear import QuantizedLinear
from megatron_averis.linear.function import LinearContext, quantized_linear
from megatron_averis.numerics import backend
from megatron_averis.recipes import RecipeError, get_recipe

PACKAGE = pathlib.Path(megatron_averis.__file__).parent
REPO = PACKAGE.parent


def _imported_modules(source: str, package: str) -> set[str]:
    """Every module an import statement of `source` (a module of `package`) names, relative
    imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def _numerics_imports(source: str) -> set[str]:
    return {m for m in _imported_modules(source, "megatron_averis.kernels")
            if m == "megatron_averis.numerics" or m.startswith("megatron_averis.numerics.")}


def test_kernels_import_nothing_from_numerics():
    files = sorted((PACKAGE / "kernels").rglob("*.py"))
    assert PACKAGE / "kernels" / "fp4.py" in files
    for path in files:
        bad = _numerics_imports(path.read_text(encoding="utf-8"))
        assert not bad, f"{path.name} imports {sorted(bad)}: kernels/ must not depend on numerics"


@pytest.mark.parametrize("line", ["from megatron_averis import numerics",
                                  "import megatron_averis.numerics.qgemm",
                                  "from megatron_averis.numerics.random import fmix32",
                                  "from ..numerics.e2m1 import E2M1_MAX",
                                  "from .. import numerics"])
def test_import_check_sees_numerics_imports(line):
    """The check above can fail: every spelling of a numerics import is found."""
    assert _numerics_imports(line)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEGATRON_AVERIS_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(REPO), clean.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_kernels_package_loads_without_numerics_and_switch_is_read_once():
    out = _python(
        "import os, sys\n"
        "import megatron_averis.kernels\n"
        "print('numerics loaded by kernels:', any(m.startswith('megatron_averis.numerics') "
        "for m in sys.modules))\n"
        "from megatron_averis.numerics import backend\n"
        "print('on at import:', backend.kernels_switched_on())\n"
        "os.environ['MEGATRON_AVERIS_KERNELS'] = '1'\n"
        "print('on after setting the variable:', backend.kernels_switched_on())\n",
        MEGATRON_AVERIS_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["numerics loaded by kernels: False", "on at import: False",
                                       "on after setting the variable: False"]


@pytest.mark.parametrize("var,old,flag,field,value", [
    ("MEGATRON_AVERIS_TOKEN_SUM", "pairwise", "--fp4-token-sum", "token_sum", "pairwise"),
    ("MEGATRON_AVERIS_FP4_GEMM", "fused", "--fp4-gemm", "fp4_gemm", "fused"),
    ("MEGATRON_AVERIS_TE_GEMM", "native", "--fp4-gemm", "fp4_gemm", "native"),
    ("MEGATRON_AVERIS_TE_GEMM", "emulated", "--fp4-gemm", "fp4_gemm", "dequant"),
])
def test_legacy_environment_variables_are_refused(var, old, flag, field, value):
    with pytest.raises(RuntimeError) as e:
        backend.check_legacy_environment({var: old})
    msg = str(e.value)
    assert f"{var}={old!r}" in msg and f"{flag} {value}" in msg and f"{field}={value}" in msg
    backend.check_legacy_environment({"MEGATRON_AVERIS_KERNELS": "0"})  # the debug switch stays


def test_legacy_environment_fails_at_import():
    out = _python("import megatron_averis.recipes", MEGATRON_AVERIS_TOKEN_SUM="pairwise")
    assert out.returncode != 0
    assert "MEGATRON_AVERIS_TOKEN_SUM='pairwise' is no longer read" in out.stderr
    assert "--fp4-token-sum pairwise" in out.stderr


def _slow_pairwise_mean(column: np.ndarray) -> np.float32:
    """FP32 pairwise tree sum, one scalar addition at a time: zero-pad to a power of two, add
    neighbours level by level; then the FP32 division by the count."""
    level = [np.float32(v) for v in column]
    size = 1
    while size < len(level):
        size *= 2
    level += [np.float32(0.0)] * (size - len(level))
    while len(level) > 1:
        level = [np.float32(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return np.float32(level[0] / np.float32(len(column)))


def _fprop_mean(token_sum: str, x: torch.Tensor) -> torch.Tensor:
    """The stored μ of the fprop input operand of an averis linear run with `token_sum`."""
    recipe = get_recipe("averis", ["inputs.mean_format=fp32", f"token_sum={token_sum}"])
    seen = {}
    ctx = LinearContext(recipe=recipe, observer=lambda role, op: seen.setdefault(role, op))
    weight = torch.randn(32, x.shape[1], generator=torch.Generator().manual_seed(1))
    quantized_linear(x, weight, None, ctx)
    return seen["fprop_input"].mean


def test_recipe_token_sum_reaches_the_mean():
    # 48 tokens (padded to 64 by the tree) with magnitudes from 1e-4 to 1e4: the summation order
    # shows in the last bits.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, generator=g) * 10.0 ** torch.randint(-4, 5, (48, 64), generator=g)
    pairwise = _fprop_mean("pairwise", x)
    in_torch_order = _fprop_mean("torch", x)
    cols = x.numpy()
    want_pairwise = np.array([_slow_pairwise_mean(cols[:, j]) for j in range(64)])
    np.testing.assert_array_equal(pairwise.numpy(), want_pairwise)
    want_torch = (x.float().sum(0) / torch.tensor(48.0)).numpy()
    np.testing.assert_array_equal(in_torch_order.numpy(), want_torch)
    assert not np.array_equal(want_pairwise, want_torch), "data too tame to tell the orders apart"
    exact = x.double().mean(0).numpy()
    bound = 64 * 2.0**-24 * np.abs(cols).astype(np.float64).sum(0) / 48
    assert (np.abs(pairwise.numpy() - exact) <= bound).all()


@pytest.mark.parametrize("fp4_gemm", ["dequant", "fused", "auto"])
def test_recipe_fp4_gemm_reaches_every_gemm(monkeypatch, fp4_gemm):
    asked = []

    def record(a, b, n_terms, path):
        asked.append(path)
        return None  # the reference runs (no kernels on this machine anyway)

    monkeypatch.setattr(backend, "fused_gemm_kernels", record)
    layer = QuantizedLinear(64, 32, recipe=get_recipe("averis", [f"fp4_gemm={fp4_gemm}"]),
                            dtype=torch.float32)
    x = torch.randn(32, 64, requires_grad=True)
    layer(x).sum().backward()
    assert asked == [fp4_gemm] * 3  # fprop, dgrad, wgrad


def test_native_gemm_needs_the_tensor_core_product():
    """fp4_gemm=native outside the Transformer Engine route (no product) is an error, not a
    silent emulation; auto emulates, bit for bit as dequant."""
    layer = QuantizedLinear(64, 32, recipe=get_recipe("averis", ["fp4_gemm=native"]),
                            dtype=torch.float32)
    with pytest.raises(ValueError, match="fp4_gemm='auto' or 'dequant'"):
        layer(torch.randn(32, 64))
    x = torch.randn(32, 64)
    outs = []
    for path in ("auto", "dequant"):
        torch.manual_seed(0)
        lin = QuantizedLinear(64, 32, recipe=get_recipe("averis", [f"fp4_gemm={path}"]),
                              dtype=torch.float32)
        outs.append(lin(x))
    assert torch.equal(outs[0], outs[1])


def test_recipe_fields_default_and_validate():
    r = get_recipe("averis")
    assert (r.token_sum, r.fp4_gemm) == ("pairwise", "dequant")
    with pytest.raises(RecipeError, match=r"token_sum='tree' is unknown; choose one of"):
        get_recipe("averis", ["token_sum=tree"])
    with pytest.raises(RecipeError, match=r"fp4_gemm='cublas' is unknown"):
        get_recipe("nvfp4", ["fp4_gemm=cublas"])
