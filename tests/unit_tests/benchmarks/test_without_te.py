"""benchmarks/without_te.py: a script it runs sees Transformer Engine as not installed."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

PROBE = """
import sys
from megatron_averis.te.availability import te_installed
try:
    import transformer_engine.pytorch
    imported = "yes"
except ModuleNotFoundError:
    imported = "no"
print(f"installed={te_installed()} imported={imported} argv={sys.argv[1:]} "
      f"path0={sys.path[0] == SCRIPT_DIR}")
"""


def _run(tmp_path, *prefix):
    fake = tmp_path / "site" / "transformer_engine"  # an importable stand-in for TE
    (fake / "pytorch").mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("")
    (fake / "pytorch" / "__init__.py").write_text("")
    script = tmp_path / "scripts" / "probe.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"SCRIPT_DIR = {str(script.parent)!r}\n" + PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO)]))
    out = subprocess.run([sys.executable, *prefix, str(script), "--flag", "x"], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_script_sees_no_transformer_engine(tmp_path):
    assert _run(tmp_path) == "installed=True imported=yes argv=['--flag', 'x'] path0=True"
    assert _run(tmp_path, str(REPO / "benchmarks" / "without_te.py")) == (
        "installed=False imported=no argv=['--flag', 'x'] path0=True")
