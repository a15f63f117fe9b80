"""The band math behind the GPU kernels' block skipping (csrc/common/attention_band.h),
checked against a brute-force scan of the visibility rule on small random cases."""
import random

import pytest

from llmkernels import backends

native = backends.native_module()
pytestmark = pytest.mark.skipif(
    native is None or not hasattr(native, "attention_band_key_block_range"),
    reason="compiled extension without the band-math binding")


def visible(i, j, len_k, left, right, off):
    return (0 <= j < len_k and (left < 0 or j >= i + off - left)
            and (right < 0 or j <= i + off + right))


def random_case(rng):
    len_q, len_k = rng.randint(0, 20), rng.randint(0, 20)
    left = rng.choice([-1, -1, 0, 1, 2, 3, 5, 30])
    right = rng.choice([-1, -1, 0, 1, 2, 3, 5, 30])
    off = rng.randint(-25, 25)
    return len_q, len_k, left, right, off


def check_range(rng_, block, seen_blocks):
    """rng_ covers every block in seen_blocks and is tight at both ends."""
    first, end = rng_
    if not seen_blocks:
        assert first == end == 0, (rng_, seen_blocks)
        return
    assert first == min(seen_blocks) and end == max(seen_blocks) + 1, (rng_, sorted(seen_blocks))


@pytest.mark.parametrize("seed", range(4))
def test_key_block_range_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(500):
        len_q, len_k, left, right, off = random_case(rng)
        block_n = rng.choice([1, 2, 3, 4, 8, 16])
        q_start = rng.randint(-2, len_q + 2)
        q_end = rng.randint(q_start, len_q + 4)
        seen = {j // block_n for i in range(max(q_start, 0), min(q_end, len_q))
                for j in range(len_k) if visible(i, j, len_k, left, right, off)}
        got = native.attention_band_key_block_range(q_start, q_end, len_q, len_k, left, right,
                                                    off, block_n)
        check_range(tuple(got), block_n, seen)


@pytest.mark.parametrize("seed", range(4))
def test_query_block_range_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    for _ in range(500):
        len_q, len_k, left, right, off = random_case(rng)
        block_m = rng.choice([1, 2, 3, 4, 8, 16])
        k_start = rng.randint(-2, len_k + 2)
        k_end = rng.randint(k_start, len_k + 4)
        seen = {i // block_m for j in range(max(k_start, 0), min(k_end, len_k))
                for i in range(len_q) if visible(i, j, len_k, left, right, off)}
        got = native.attention_band_query_block_range(k_start, k_end, len_q, len_k, left, right,
                                                      off, block_m)
        check_range(tuple(got), block_m, seen)


def test_kernel_block_tiling_covers_every_visible_pair():
    # The kernels' own loop: for each query block of 64 the key blocks of 64 (forward) and 32
    # (dQ); for each key block of 64 the query blocks of 32 (dK/dV).
    rng = random.Random(7)
    for _ in range(40):
        len_q, len_k = rng.randint(0, 200), rng.randint(0, 200)
        left, right = rng.choice([-1, 0, 17, 70]), rng.choice([-1, 0, 9, 64])
        off = rng.randint(-100, 100)
        pairs = {(i, j) for i in range(len_q) for j in range(len_k)
                 if visible(i, j, len_k, left, right, off)}
        for bm, bn in ((64, 64), (64, 32)):
            covered = set()
            for m0 in range(0, len_q, bm):
                first, end = native.attention_band_key_block_range(
                    m0, m0 + bm, len_q, len_k, left, right, off, bn)
                covered |= {(i, j) for i in range(m0, min(m0 + bm, len_q))
                            for j in range(first * bn, min(end * bn, len_k))}
            assert pairs <= covered
        covered = set()
        for n0 in range(0, len_k, 64):
            first, end = native.attention_band_query_block_range(
                n0, n0 + 64, len_q, len_k, left, right, off, 32)
            covered |= {(i, j) for j in range(n0, min(n0 + 64, len_k))
                        for i in range(first * 32, min(end * 32, len_q))}
        assert pairs <= covered


def test_huge_windows_and_offsets_do_not_overflow():
    big = 2 ** 62
    assert tuple(native.attention_band_key_block_range(0, 4, 4, 10, big, big, 0, 4)) == (0, 3)
    assert tuple(native.attention_band_key_block_range(0, 4, 4, 10, 0, 0, -big, 4)) == (0, 0)
    assert tuple(native.attention_band_query_block_range(0, 10, 4, 10, big, big, big, 4)) == (0, 1)
    assert tuple(native.attention_band_query_block_range(0, 10, 4, 10, 0, big, big, 4)) == (0, 0)
