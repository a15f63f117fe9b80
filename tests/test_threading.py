"""The C++ parallel loops: concurrent Python threads, forked children (DataLoader workers),
thread counts that change between calls; and the two runtimes they run on, torch's OpenMP
threads when torch loaded a runtime, else a pool of our own (csrc/common/thread_pool.h): both
hand out every item once, keep thread indices below the thread count, carry exceptions back
and give the kernels the same results."""
import concurrent.futures
import multiprocessing as mp
import os
import subprocess
import sys
import threading

import pytest
import torch

import llmkernels
from llmkernels import backends


def _attention(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 150, 32, generator=g) for _ in range(3))
    return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")


def test_concurrent_python_threads_get_their_own_answers():
    expected = [_attention(s) for s in range(6)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(_attention, range(6)))
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _child(queue, q, k, v):
    # No torch reduction in the child: torch's OpenMP pool is not fork-safe once the parent
    # used it from several threads (a libgomp limit, seen hanging in out.sum()), so the
    # sum is taken with numpy.
    out = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    queue.put(float(out.numpy().astype("float64").sum()))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_can_use_the_kernel():
    q, k, v = (torch.randn(2, 4, 150, 32) for _ in range(3))
    expected = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    ctx = mp.get_context("fork")  # the parent's pool threads exist; the child has none
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, q, k, v))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
    assert proc.exitcode == 0, "child crashed or hung"
    assert abs(queue.get(timeout=5) - float(expected.sum())) < 1e-3


def test_changing_thread_counts():
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 3, 2, os.cpu_count() or 1):
            torch.set_num_threads(n)
            outs.append(_attention(5))
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=0, rtol=0)


native = backends.native_module()
needs_native = pytest.mark.skipif(native is None, reason="needs the compiled extension")


_MANY_THREADS = """
import torch, llmkernels
q = k = v = torch.ones(1, 1, 3, 8)
x, qw = torch.ones(2, 64), llmkernels.quantize_weight(torch.ones(4, 64), "int8")
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
opt = llmkernels.optim.AdamW([p], lr=0.5)
torch.set_num_threads(1100)
out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu")
y = llmkernels.quant_matmul(x, qw, backend="cpu")
opt.step()
print(float(out.sum()), float(y.sum()), p.tolist())
"""


@needs_native
def test_more_torch_threads_than_the_kernels_take():
    """torch.set_num_threads above 1024 (the parallel loops' limit) made every kernel call
    raise 'num_threads out of range'; they now use 1024 at most. (In a child process: the
    1100 threads stay out of this one.)"""
    out = subprocess.run([sys.executable, "-c", _MANY_THREADS], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["24.0", "512.0"]


@pytest.fixture(params=["openmp", "pool"])
def runtime(request):
    """Each test on torch's OpenMP runtime (when this process has one) and on our pool."""
    before = native.threading_runtime()
    path = backends._openmp_runtime_of_torch()
    if request.param == "openmp":
        if not path or not native.use_openmp_runtime(path):
            pytest.skip("no OpenMP runtime loaded by torch here")
    else:
        native.use_openmp_runtime("")
    yield native.threading_runtime()
    native.use_openmp_runtime(before[len("openmp:"):] if before.startswith("openmp:") else "")
    assert native.threading_runtime() == before


@needs_native
def test_torchs_runtime_is_used_when_loaded():
    path = backends._openmp_runtime_of_torch()
    got = llmkernels.build_info()["cpu"]["threading"]
    assert got == (f"openmp:{path}" if path else "pool")


@needs_native
def test_openmp_can_be_turned_off():
    code = "import llmkernels; print(llmkernels.build_info()['cpu']['threading'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, LLMKERNELS_OPENMP="0")).stdout
    assert out.strip().splitlines()[-1] == "pool"


@needs_native
def test_a_runtime_that_is_not_loaded_is_refused():
    before = native.threading_runtime()
    assert not native.use_openmp_runtime("/nonexistent/libgomp.so.1")
    assert native.threading_runtime() == before


@needs_native
@pytest.mark.parametrize("nthreads", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_every_item_once(runtime, n, nthreads):
    got = native.parallel_for_selftest(n, nthreads, -1)
    assert [x >> 10 for x in got] == [1] * n
    assert all((x & 1023) < nthreads for x in got)


@needs_native
def test_exceptions_come_back(runtime):
    with pytest.raises(RuntimeError, match="item 123"):
        native.parallel_for_selftest(1000, 2, 123)
    # and the runtime still works afterwards
    assert [x >> 10 for x in native.parallel_for_selftest(100, 2, -1)] == [1] * 100


@needs_native
def test_calls_from_several_threads(runtime):
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(native.parallel_for_selftest(300, 2, -1))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 60 and all([x >> 10 for x in r] == [1] * 300 for r in results)


@needs_native
def test_kernels_give_the_same_results(runtime):
    """An optimizer step, an attention call and decoding rows through quantized weights of a
    small model's sizes (torch's threads split them from 32 KiB of weights, our pool from
    512 KiB: csrc/common/thread_pool.h): the same bits on either runtime (items are
    independent; the split across threads does not enter the arithmetic)."""
    torch.manual_seed(0)
    p = torch.randn(300_001, requires_grad=True)
    p.grad = torch.randn(300_001)
    opt = llmkernels.optim.AdamW([p], lr=1e-2)
    opt.step()
    q, k, v = (torch.randn(2, 4, 300, 64) for _ in range(3))
    out = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = torch.randn(3, 768).bfloat16()
    qws = [llmkernels.quantize_weight(torch.randn(n, 768), s) for s in ("int8", "int4", "w8a8")
           for n in (256, 2048)]
    ys = [llmkernels.quant_matmul(x[:m], qw) for qw in qws for m in (1, 3)]
    torch.manual_seed(0)
    p2 = torch.randn(300_001, requires_grad=True)
    p2.grad = torch.randn(300_001)
    native.use_openmp_runtime("")  # the reference run: our pool, one thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        opt2 = llmkernels.optim.AdamW([p2], lr=1e-2)
        opt2.step()
        ref = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
        y_refs = [llmkernels.quant_matmul(x[:m], qw) for qw in qws for m in (1, 3)]
    finally:
        torch.set_num_threads(threads)
        if runtime.startswith("openmp:"):
            native.use_openmp_runtime(runtime[len("openmp:"):])
    assert torch.equal(p.detach(), p2.detach())
    assert torch.equal(out, ref)
    for y, y_ref in zip(ys, y_refs):
        assert torch.equal(y, y_ref)
