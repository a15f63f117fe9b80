"""The Triton attention kernels compile for a GPU (sm_90) without one: the interpreter that
runs them in the other tests executes Python, not Triton's compiler, so a type or control-flow
error in kernel code would first show on a GPU. A subprocess (the tests' process runs Triton
interpreted) compiles the masked specializations; benchmarks/triton_compile_check.py compiles
them all."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "triton_compile_check.py")


def test_masked_attention_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True,
                         env=env, timeout=600)
    if "No module named 'triton.backends.nvidia'" in run.stderr:
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("\nok ") + run.stdout.startswith("ok ") == 11, run.stdout
