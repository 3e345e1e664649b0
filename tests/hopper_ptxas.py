"""ptxas's verdict on a kernel compiled for sm_90a: the one helper of the compile_*_for_hopper.py scripts.

Triton ships its own ptxas (backends/nvidia/bin), so the verdict is that of the Triton release
installed: the GPU machine's may differ (tests/test_hopper_compile.py runs the scripts under both).
"""

import os
import re
import subprocess
import tempfile

import triton


def ptxas_usage(ptx: str) -> dict:
    """Registers per thread and spill bytes (stores + loads) that ptxas -v reports for sm_90a."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr[-2000:]}")
    registers = re.search(r"Used (\d+) registers", result.stderr)
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    if registers is None or len(spills) != 2:
        raise RuntimeError(f"unexpected ptxas -v output: {result.stderr[-2000:]}")
    return {"registers": int(registers.group(1)), "spill_bytes": sum(spills)}
