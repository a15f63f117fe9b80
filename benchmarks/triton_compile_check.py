"""Compiles the Triton attention kernels for a GPU target without a GPU (Triton's front end,
its GPU passes and ptxas), for each mask / band / decode specialization: code that runs in the
interpreter can still fail to compile (types, control flow), and this finds that here, before
a GPU session. No kernel runs.

    python benchmarks/triton_compile_check.py [--arch 90] [--quick]

Prints each kernel's registers and stack (spills) and shared memory: a proxy of its speed
before a GPU times it. Exit status 1 if any specialization fails to compile."""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llmkernels.kernels import attention as A  # noqa: E402


def signature(fn, types, constexprs):
    """Every parameter typed: pointers by name, constexprs, and i32 for the rest (strides,
    sizes, offsets), fp32 for the scale and softcap."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in ("scale", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def attention_cases():
    """(name, fn, pointer types, constexprs, (num_warps, num_stages)) of the specializations
    worth compiling."""
    elem = "*bf16"
    base_ptrs = {"Q": elem, "K": elem, "V": elem, "O": elem, "DO": elem, "DK": elem, "DV_": elem,
                 "DQ": elem, "LSE": "*fp32", "O_PART": "*fp32", "LSE_PART": "*fp32",
                 "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "SEQUSED_K": "*i32",
                 "RANGES": "*i32"}
    for mask, band in itertools.product(("none", "bool", "float"), ("none", "causal")):
        ptrs = dict(base_ptrs, MASK={"none": elem, "bool": "*u8", "float": "*fp32"}[mask])
        flags = dict(VARLEN_Q=False, VARLEN_K=False, HAS_SEQUSED=False, BOTTOM_RIGHT=False,
                     HAS_SOFTCAP=False, HAS_LEFT=False, HAS_RIGHT=band == "causal",
                     HAS_MASK=mask != "none", MASK_BOOL=mask == "bool", PRECISION="tf32",
                     BLOCK_D=128, BLOCK_DV=128)
        tag = f"mask={mask} band={band}"
        # the first of each kernel's autotuning configs (kernels/attention.py)
        yield (f"fwd {tag}", A._fwd_kernel, ptrs,
               dict(flags, PACK_GQA=False, NUM_SPLITS=1, BLOCK_M=128, BLOCK_N=64), (8, 3))
        yield (f"decode splits {tag}", A._fwd_kernel, ptrs,
               dict(flags, PACK_GQA=True, NUM_SPLITS=4, BLOCK_M=16, BLOCK_N=64), (4, 2))
        yield (f"dkdv {tag}", A._bwd_dkdv_kernel, ptrs, dict(flags, BLOCK_M=64, BLOCK_N=128),
               (8, 3))
        yield (f"dq {tag}", A._bwd_dq_kernel, ptrs, dict(flags, BLOCK_M=128, BLOCK_N=64), (8, 3))
    for kind, ptr in (("bool", "*u8"), ("float", "*fp32"), ("bf16", "*bf16")):
        yield (f"ranges {kind}", A._ranges_kernel, {"MASK": ptr, "OUT": "*i32"},
               dict(MASK_BOOL=kind == "bool", BLOCK=256), (4, 1))


def resources(cubin: bytes) -> str:
    """Registers and stack (spills) of the kernel, from Triton's bundled cuobjdump (the
    loader reports them only on a GPU)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        run = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", run.stdout)
    return f"{found.group(1)} registers, stack {found.group(2)} bytes" if found else "usage ?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="sm architecture (default 90)")
    p.add_argument("--quick", action="store_true",
                   help="the masked, causal specializations and the ranges kernel only")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, ptrs, constexprs, (warps, stages) in attention_cases():
        if args.quick and not (name.startswith("ranges") or
                               ("mask=none" not in name and "band=causal" in name)):
            continue
        src = ASTSource(fn, signature(fn, ptrs, constexprs), constexprs)
        try:
            compiled = triton.compile(src, target=target, options={"num_warps": warps,
                                                                   "num_stages": stages})
            print(f"ok    {name}: {resources(compiled.asm['cubin'])}, shared "
                  f"{compiled.metadata.shared} bytes", flush=True)
        except Exception:  # report every specialization, then fail
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc(limit=3)}", flush=True)
    print(f"{failed} failed" if failed else "all compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
