"""Every Triton kernel the ops launch on a GPU compiles for sm_90 (H100/H200), checked on a CPU.

The interpreter never runs Triton's compiler, so these tests run the compile_*_for_hopper.py
scripts beside this file in a process without TRITON_INTERPRET: each compiles its kernels'
variants for sm_90 with ptxas and fails on what a GPU run would suffer (a compile error, loads
that are not software-pipelined, register spills, more shared memory than a block has).

Register allocation differs between Triton releases (each ships its own ptxas): we found a
dgrad tile that fits in triton 3.8 and spills under 3.6, the GPU machine's version. So when
FASTRESNET_GPU_TRITON_PYTHON names a Python whose Triton is the GPU's (for example a venv made
with `python3 -m venv --system-site-packages V && V/bin/pip install --no-deps triton==3.6.0`),
every script also runs under it, pointed at this checkout's fastresnet and kernels/ (BOOTSTRAP)
whatever checkout that Python has installed.
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
    "compile_conv_gemm_for_hopper.py": ["1x1 GEMM conv tiles for sm_90a: TMA + wgmma, no spills"],
}

# The other Python's editable install of fastresnet may point at another checkout (a venv kept for the
# GPU's Triton serves several worktrees): run each script with this checkout's fastresnet and fastresnet.kernels
# (kernels/ is mapped under fastresnet by pyproject's package-dir, so sys.path alone does not find it).
BOOTSTRAP = """
import importlib.util, runpy, sys
root, script = sys.argv[1], sys.argv[2]
sys.path[:0] = [script.rsplit("/", 1)[0], root]
import fastresnet
assert fastresnet.__file__.startswith(root), fastresnet.__file__
spec = importlib.util.spec_from_file_location(
    "fastresnet.kernels", root + "/kernels/__init__.py", submodule_search_locations=[root + "/kernels"])
kernels = importlib.util.module_from_spec(spec)
sys.modules["fastresnet.kernels"] = fastresnet.kernels = kernels
spec.loader.exec_module(kernels)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def _pythons() -> list:
    pythons = [pytest.param(sys.executable, id="this-triton")]
    other = os.environ.get(GPU_TRITON_PYTHON)
    if other:
        pythons.append(pytest.param(other, id="gpu-triton"))
    return pythons


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cuda tests compile the kernels for real")
@pytest.mark.parametrize("python", _pythons())
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_kernels_compile_for_hopper_without_a_gpu(script, python):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = Path(__file__).with_name(script)
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([python, "-c", BOOTSTRAP, root, str(path.resolve())], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in SCRIPTS[script]:
        assert expected in result.stdout, result.stdout
