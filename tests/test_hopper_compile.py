"""Every Triton kernel the ops launch on a GPU compiles for sm_90 (H100/H200), checked on a CPU.

The interpreter never runs Triton's compiler, so these tests run the compile_*_for_hopper.py
scripts beside this file in a process without TRITON_INTERPRET: each compiles its kernels'
variants for sm_90 with ptxas and fails on what a GPU run would suffer (a compile error, loads
that are not software-pipelined, register spills, more shared memory than a block has).

Register allocation differs between Triton releases (each ships its own ptxas): session 2 found a
dgrad tile that fits in triton 3.8 and spills under 3.6, the GPU machine's version. So when
FASTRESNET_GPU_TRITON_PYTHON names a Python whose Triton is the GPU's (for example a venv made
with `python3 -m venv --system-site-packages V && V/bin/pip install --no-deps triton==3.6.0`),
every script also runs under it. That Python may have another checkout installed (an editable
install of the main worktree): the scripts are pointed at this checkout's fastresnet and kernels/
through a PYTHONPATH tree of links, which comes before the editable install's finder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU_TRITON_PYTHON = "FASTRESNET_GPU_TRITON_PYTHON"

# script -> lines its output must contain
SCRIPTS = {
    "compile_for_hopper.py": ["compiled 14 kernel variants"],
    "compile_conv_for_hopper.py": ["conv tiles for sm_90a: no spills"],
    "compile_conv_train_for_hopper.py": [
        "conv_stats tiles: 8 compiled", "_bn_stats_merge: ok", "backward tiles: 12 compiled", "backward kernels: ok"
    ],
}


def _pythons() -> list:
    pythons = [pytest.param(sys.executable, id="this-triton")]
    other = os.environ.get(GPU_TRITON_PYTHON)
    if other:
        pythons.append(pytest.param(other, id="gpu-triton"))
    return pythons


def _this_checkout_first(tmp_path: Path) -> str:
    """A folder whose fastresnet/ links this checkout's package and kernels/ (as pyproject maps them)."""
    repo = Path(__file__).resolve().parent.parent
    package = tmp_path / "fastresnet"
    package.mkdir()
    for entry in (repo / "fastresnet").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(repo / "kernels")
    return str(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cuda tests compile the kernels for real")
@pytest.mark.parametrize("python", _pythons())
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_kernels_compile_for_hopper_without_a_gpu(script, python, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([_this_checkout_first(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    imported = subprocess.run([python, "-c", "import fastresnet.kernels.conv as m; print(m.__file__)"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    repo = Path(__file__).resolve().parent.parent
    assert Path(imported.stdout.strip()).resolve() == repo / "kernels" / "conv.py", imported.stdout + imported.stderr
    path = Path(__file__).with_name(script)
    result = subprocess.run([python, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in SCRIPTS[script]:
        assert expected in result.stdout, result.stdout
