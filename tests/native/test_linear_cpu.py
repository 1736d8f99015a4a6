"""The native CPU fused LM head (csrc/cpu/linear_cpu.cpp) on shapes that take its chunked paths:
several vocabulary chunks and token tiles (row statistics merged across chunks), several d_hidden
groups, token blocks (fp32 d_weight accumulated in place, bf16 in a second sweep), masked chunks,
vocabulary shards, extreme logit offsets and temperatures, and batch invariance across batch sizes
and thread counts. Values are held to the float64 oracle under the project's rule (test_linear's
``check``)."""

import math

import pytest
import torch

from fastdpo import ops
from test_linear import DTYPES, check, make


def fwd(*args):
    return ops.get_op("native", "linear_logps_fwd")(*args)


def bwd(*args):
    return ops.get_op("native", "linear_logps_bwd")(*args)


def cols(C, V=1 << 20, H=16):
    return C.linear_cpu_plan(V, H)[1]


def test_tile_plan_fits_half_of_l2(C):
    rows, vc, l2, l3 = C.linear_cpu_plan(128256, 256)
    assert l2 > 0 and l3 > 0
    assert rows == 256 and vc % 64 == 0 and vc >= 128
    assert rows * vc * 4 <= max(l2 // 2, rows * 128 * 4)
    assert C.linear_cpu_plan(100, 16)[1] == 100  # a small vocabulary is one tile
    # the plan depends on V and H only: nothing of the batch or the threads
    assert C.linear_cpu_plan(128256, 256) == C.linear_cpu_plan(128256, 256)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_chunks_and_tiles(C, kernel, dtype):
    V = 2 * cols(C) + 77  # three chunks, the last partial
    h, w, b, y = make((600,), 16, V, dtype, seed=40, bias=True)  # three token tiles
    check("native", h, w, b, y, softcap=5.0, logit_scale=0.9, temperature=0.7)
    check("native", h, w, None, y, shift=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_blocks(C, dtype):
    """d_hidden groups of 2048 x 1024 fp32 exceed the budget: tokens go in blocks (fp32 d_weight
    accumulated in place across blocks, bf16 in a second sweep over all tokens)."""
    N, H, V = 2048, 1024, 1024
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the group count follows the threads (earlier tests may leave 1)
    try:
        groups, block, _ = C.linear_cpu_bwd_plan(N, V, H,
                                                 torch.tensor([], dtype=dtype).element_size())
        assert groups >= 2 and block < N
        check("native", *make((N,), H, V, dtype, seed=41, bias=True), softcap=20.0)
    finally:
        torch.set_num_threads(threads)


def test_few_groups_are_a_multiple_of_the_threads(C):
    """Each d_hidden group is one work item: 3 groups on 2 threads left one thread idle for the
    last third of the backward (the DPO chunk of 1024 rows at H = 1024, V = 128256)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for N, H, V in ((1024, 1024, 128256), (4096, 1024, 128256), (1000, 700, 50000)):
            groups, _, _ = C.linear_cpu_bwd_plan(N, V, H, 4)
            assert groups % 2 == 0 or groups >= 8, (N, H, V, groups)
    finally:
        torch.set_num_threads(threads)


def test_plan_counts_each_threads_buffers(C):
    """The backward's plan gave the d_hidden group buffers half the budget whatever the threads'
    own buffers took (tile logits, the d_hidden product, fp32 copies of bf16 rows): at a large H
    in bf16 the threads' buffers and the groups together passed the budget. The groups now get
    what the threads leave, down to one token tile per group and one group per thread."""
    V = 128256
    threads = torch.get_num_threads()
    squeezed = 0
    try:
        for t in (2, 16):
            torch.set_num_threads(t)
            for H in (1024, 4096, 8192):
                rows, vc, _, _ = C.linear_cpu_plan(V, H)
                for N in (2048, 4096, 6144, 8192, 16384):
                    groups, block, scratch = C.linear_cpu_bwd_plan(N, V, H, 2)
                    # logits tile; d_hidden product and bf16 hidden rows; bf16 weight, d_weight
                    assert scratch == 4 * (rows * vc + 2 * rows * H + 2 * vc * H)
                    budget = max(16 << 20, int(0.05 * N * V * 2))
                    part = max(4 << 20, min(budget // 2, budget - t * scratch))
                    group_bytes = groups * block * H * 4
                    floor = groups * rows * H * 4  # one token tile per group
                    assert groups >= t and (block == N or block % rows == 0)
                    assert group_bytes <= max(part, floor), (t, H, N)
                    squeezed += budget // 2 > part > 4 << 20
                    if t * scratch > budget:  # the threads alone pass the budget: the floor
                        assert groups == t and block == rows, (t, H, N)
        assert squeezed, "no shape where the threads' buffers shrink the groups' share"
        torch.set_num_threads(2)
        # fp32 at a small H: the threads' buffers are small, the groups keep half the budget
        budget = max(16 << 20, int(0.05 * 2048 * V * 4))
        groups, block, scratch = C.linear_cpu_bwd_plan(2048, V, 256, 4)
        assert 2 * scratch < budget // 2 and groups * block * 256 * 4 <= budget // 2
        assert C.linear_cpu_bwd_plan(2048, V, 256, 4, softcap=True)[2] > scratch  # the tanh
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("temperature", [1.0, 0.01])
@pytest.mark.parametrize("offset", [1e3, -1e3, 1e4, 1e8, -1e8])
def test_extreme_offsets_and_temperature(C, offset, temperature):
    """Logits exact in fp32 (integer hidden states, weights on a grid no coarser than the
    offset's ulp), so any error is the row math's: it must not grow with the offset."""
    check("native", *exact_offset_case(2 * cols(C) + 40, offset, seed=42),
          temperature=temperature)


def exact_offset_case(V, offset, *, seed):
    """``(h, w, bias, labels)`` whose logits are exact in fp32 around ``offset``."""
    g = torch.Generator().manual_seed(seed)
    step = max(1.0 / 32, math.ulp(torch.tensor(offset, dtype=torch.float32).item()))
    h = torch.randint(-3, 4, (300, 16), generator=g).float()
    w = torch.randint(-3, 4, (V, 16), generator=g).float() * step
    y = torch.randint(0, V, (300,), generator=g)
    y[::5] = -100
    return h, w, torch.full((V,), offset), y


def test_masked_chunks_shards_and_bad_labels(C):
    """A chunk with no finite logit, labels inside it (log-prob -inf), invalid labels (NaN) and
    labels of another vocabulary shard (-lse): as the torch backend's loop."""
    vc = cols(C)
    V = 3 * vc
    h, w, _, y = make((40,), 16, V, torch.float32, seed=43, ignore_frac=0.0)
    b = torch.zeros(V)
    b[:vc] = -math.inf
    y[0], y[1], y[2], y[3] = 3, V + 250, V + 5, -100  # dead chunk, invalid, off-shard, ignored
    args = (-100, 0.9, 1.0, 0.0, 100, V + 200, True, False)
    got = fwd(h, w, b, y + (y >= 0) * 100, *args)
    want = ops.get_op("torch", "linear_logps_fwd")(h, w, b, y + (y >= 0) * 100, *args)
    assert got[0][0] == -math.inf and math.isnan(got[0][1]) and got[0][3] == 0
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, equal_nan=True, rtol=1e-5, atol=1e-5)
    g = torch.randn(40)
    gb = bwd(g, g, h, w, b, y, got[1], got[2], got[3], -100, 0.9, 1.0, 0.0, 0, V, True, True,
             True, False)
    ref = ops.get_op("torch", "linear_logps_bwd")(g, g, h, w, b, y, got[1], got[2], got[3], -100,
                                                  0.9, 1.0, 0.0, 0, V, True, True, True, False)
    for a, e in zip(gb, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_every_row_ignored_and_no_grads(C):
    h, w, b, y = make((9,), 16, 700, torch.float32, seed=44, bias=True)
    y[:] = -100
    out = fwd(h, w, b, y, -100, 1.0, 1.0, 0.0, 0, 700, True, False)
    assert all(torch.equal(t, torch.zeros(9)) for t in out)
    g = torch.ones(9)
    d_h, d_w, d_b = bwd(g, None, h, w, b, y, out[1], out[2], None, -100, 1.0, 1.0, 0.0, 0, 700,
                        True, True, True, False)
    assert not d_h.any() and not d_w.any() and not d_b.any() and d_b.shape == b.shape
    d_h, d_w, d_b = bwd(g, None, h, w, None, y, out[1], out[2], None, -100, 1.0, 1.0, 0.0, 0,
                        700, False, False, True, False)
    assert d_h.numel() == d_w.numel() == d_b.numel() == 0


def test_refuses_bad_arguments(C):
    h, w, b, y = make((4,), 16, 30, torch.float32)
    with pytest.raises(RuntimeError, match="float64"):
        fwd(h.double(), w, b, y, -100, 1.0, 1.0, 0.0, 0, 30, False, False)
    with pytest.raises(RuntimeError, match="softcap"):
        fwd(h, w, b, y, -100, 1.0, 1.0, -1.0, 0, 30, False, False)
    with pytest.raises(RuntimeError, match="bias"):
        fwd(h, w, torch.zeros(3), y, -100, 1.0, 1.0, 0.0, 0, 30, False, False)
    with pytest.raises(RuntimeError, match="entropy is required"):
        bwd(torch.ones(4), torch.ones(4), h, w, b, y, torch.zeros(4), torch.zeros(4), None, -100,
            1.0, 1.0, 0.0, 0, 30, True, False, False, False)


def test_batch_invariant_any_batch_and_thread_count(C):
    """A row's log-prob, statistics, entropy and d_hidden row are bitwise the same alone, in
    batches of any size and with 1 or 2 threads; without the flag the results are still the
    same from run to run."""
    g = torch.Generator().manual_seed(45)
    N, H, V = 300, 16, 2 * cols(C) + 50
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[5::4] = -100
    gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)
    threads = torch.get_num_threads()
    seen = []
    try:
        for t in sorted({1, max(2, threads)}):
            torch.set_num_threads(t)
            for rows in (torch.arange(N), torch.tensor([7, 0, 5]), torch.tensor([0]),
                         torch.arange(0, N, 2)):
                out = fwd(h[rows], w, b, labels[rows], -100, 0.7, 1.0, 2.0, 0, V, True, True)
                d_h, _, _ = bwd(gl[rows], ge[rows], h[rows], w, b, labels[rows], out[1], out[2],
                                out[3], -100, 0.7, 1.0, 2.0, 0, V, True, True, True, True)
                k = int((rows == 0).nonzero())
                seen.append([float(o[k]) for o in out] + d_h[k].tolist())
    finally:
        torch.set_num_threads(threads)
    assert all(s == seen[0] for s in seen[1:])
    runs = []
    for _ in range(2):
        out = fwd(h, w, b, labels, -100, 0.7, 1.0, 2.0, 0, V, True, False)
        runs.append(out + bwd(gl, ge, h, w, b, labels, out[1], out[2], out[3], -100, 0.7, 1.0,
                              2.0, 0, V, True, True, True, False))
    assert all(torch.equal(a, c) for a, c in zip(*runs))


@pytest.mark.parametrize("N", [0, 3])
def test_refuses_an_empty_vocabulary(C, N):
    """A (0, H) weight has no row to normalise over: ValueError naming the weight, not outputs
    left uninitialised (at::empty) by a loop over no vocabulary chunk."""
    h, y = torch.randn(N, 8), torch.arange(N)
    w = torch.randn(0, 8)
    with pytest.raises(ValueError, match="weight.*empty vocabulary"):
        fwd(h, w, None, y, -100, 1.0, 1.0, 0.0, 0, 50, True, False)
    g = torch.ones(N)
    with pytest.raises(ValueError, match="weight.*empty vocabulary"):
        bwd(g, None, h, w, None, y, g, g, None, -100, 1.0, 1.0, 0.0, 0, 50, True, True, False,
            False)
