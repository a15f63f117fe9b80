"""The kernel's own thread pool: concurrent Python threads, forked children (DataLoader
workers), and thread counts that change between calls."""
import concurrent.futures
import multiprocessing as mp
import os
import sys

import pytest
import torch

import llmkernels


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
