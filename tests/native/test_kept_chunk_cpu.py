"""The native CPU kept chunk (native_linear_keep_fwd / _bwd, csrc/cpu/linear_cpu.cpp): a
trainable head's chunk with its logits kept in a caller's buffer, so the backward needs no
recompute. Against the recomputing native ops on the same tiles (bitwise without softcap, whose
chain rule takes the tanh back from the kept logits), both CPU kernels, batch invariance across
thread counts, d_weight / d_bias accumulating across calls, and opcheck."""

import pytest
import torch

from fastdpo import ops
from test_linear import DTYPES, make


def keep_for(C, h, w, invariant=False):
    return torch.empty(C.linear_keep_numel(h.shape[0], w.shape[0], w.shape[1], invariant))


def kept(C, h, w, b, y, g, args, invariant=False, need_h=True, acc_w=True, acc_b=True):
    keep = keep_for(C, h, w, invariant)
    lp, m, s, _ = ops.get_op("native", "linear_keep_fwd")(h, w, b, y, *args, invariant, keep)
    d_w = torch.zeros(w.shape) if acc_w else torch.empty(0)
    d_b = torch.zeros(w.shape[0]) if (acc_b and b is not None) else torch.empty(0)
    d_h = ops.get_op("native", "linear_keep_bwd")(keep, g, h, w, b, y, m, s, *args, invariant,
                                                  need_h, d_w, d_b)
    return lp, m, s, d_h, d_w, d_b


def recomputed(h, w, b, y, g, args, invariant=False):
    V = w.shape[0]
    lp, m, s, _ = ops.get_op("native", "linear_logps_fwd")(h, w, b, y, *args, 0, V, False,
                                                           invariant)
    d_h, d_w, d_b = ops.get_op("native", "linear_logps_bwd")(
        g, None, h, w, b, y, m, s, None, *args, 0, V, True, True, b is not None, invariant)
    return lp, m, s, d_h, d_w, d_b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_kept_equals_recomputed(C, kernel, dtype, softcap):
    """Rows over several token tiles and vocabulary chunks (V spans more than one chunk)."""
    V = 3 * C.linear_cpu_plan(1 << 20, 16)[1] + 5
    h, w, b, y = make((300,), 16, V, dtype, seed=71, bias=True, ignore_frac=0.0)
    g = torch.randn(300, generator=torch.Generator().manual_seed(2))
    args = (-100, 0.8, 1.3, softcap)
    tol = dict(rtol=2e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    got, want = kept(C, h, w, b, y, g, args), recomputed(h, w, b, y, g, args)
    for i, (a, e) in enumerate(zip(got[:3], want[:3])):  # the forward: same tiles, same bits
        assert torch.equal(a, e), i
    exact = softcap == 0.0 and dtype == torch.float32
    for i, (a, e) in enumerate(zip(got[3:], want[3:])):
        if exact:
            assert torch.equal(a, e), i
        else:
            torch.testing.assert_close(a.float(), e.float(), **tol)
    # ignored rows inside the chunk (the recomputing op skips them, so other tiles): no gradient
    y[::7] = -100
    got, want = kept(C, h, w, b, y, g, args), recomputed(h, w, b, y, g, args)
    assert not got[3][::7].any() and not got[0][::7].any()
    loose = dict(rtol=2e-2, atol=1e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    for a, e in zip(got, want):  # fp32 sums over other tiles: not the same bits
        torch.testing.assert_close(a.float(), e.float(), **loose)


def test_accumulators_add_across_chunks(C):
    """Two chunks' d_weight / d_bias add into the same fp32 accumulators."""
    h, w, b, y = make((90,), 16, 257, torch.float32, seed=72, bias=True, ignore_frac=0.0)
    g = torch.randn(90, generator=torch.Generator().manual_seed(3))
    args = (-100, 1.0, 1.0, 0.0)
    d_w, d_b = torch.zeros(w.shape), torch.zeros(257)
    fwd, bwd = ops.get_op("native", "linear_keep_fwd"), ops.get_op("native", "linear_keep_bwd")
    for sl in (slice(0, 40), slice(40, 90)):
        keep = keep_for(C, h[sl], w)
        lp, m, s, _ = fwd(h[sl], w, b, y[sl], *args, False, keep)
        bwd(keep, g[sl], h[sl], w, b, y[sl], m, s, *args, False, False, d_w, d_b)
    want = recomputed(h, w, b, y, g, args)
    torch.testing.assert_close(d_w, want[4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_b, want[5], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_entropy_and_the_recomputing_backward(C, softcap):
    """with_entropy: the kept forward's entropy (and log-probs) are the native forward's bits;
    an empty keep makes the backward recompute the logits, adding into the accumulators what
    the recomputing native backward returns."""
    h, w, b, y = make((90,), 16, 257, torch.float32, seed=75, bias=True)
    g = torch.randn(90, generator=torch.Generator().manual_seed(6))
    args = (-100, 0.8, 1.1, softcap)
    fwd, bwd = ops.get_op("native", "linear_keep_fwd"), ops.get_op("native", "linear_keep_bwd")
    keep = keep_for(C, h, w)
    got = fwd(h, w, b, y, *args, False, keep, True)
    want = ops.get_op("native", "linear_logps_fwd")(h, w, b, y, *args, 0, 257, True, False)
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    assert fwd(h, w, b, y, *args, False, keep)[3].numel() == 0
    d_w, d_b = torch.ones(w.shape), torch.ones(257)  # accumulators already holding a sum
    d_h = bwd(torch.empty(0), g, h, w, b, y, got[1], got[2], *args, False, True, d_w, d_b)
    ref = recomputed(h, w, b, y, g, args)
    torch.testing.assert_close(d_h, ref[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_w - 1, ref[4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_b - 1, ref[5], rtol=1e-5, atol=1e-6)


def test_batch_invariant_across_threads(C):
    """batch_invariant: a row's log-prob and d_hidden are bitwise the same at 1 and 2 threads
    and inside a larger batch."""
    h, w, b, y = make((200,), 16, 500, torch.float32, seed=73, bias=True, ignore_frac=0.0)
    g = torch.randn(200, generator=torch.Generator().manual_seed(4))
    args = (-100, 1.0, 1.0, 0.0)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n, rows in ((1, 200), (2, 200), (2, 37)):
            torch.set_num_threads(n)
            out = kept(C, h[:rows], w, b, y[:rows], g[:rows], args, invariant=True)
            outs.append((out[0][:37], out[3][:37]))
    finally:
        torch.set_num_threads(threads)
    for lp, dh in outs[1:]:
        assert torch.equal(lp, outs[0][0]) and torch.equal(dh, outs[0][1])


def test_opcheck(C):
    h, w, b, y = make((70,), 16, 300, torch.float32, seed=74, bias=True)
    g = torch.randn(70, generator=torch.Generator().manual_seed(5))
    args = (-100, 0.7, 1.0, 4.0, False)
    keep = keep_for(C, h, w)
    fwd, bwd = ops.get_op("native", "linear_keep_fwd"), ops.get_op("native", "linear_keep_bwd")
    torch.library.opcheck(fwd, (h, w, b, y, *args, keep))
    torch.library.opcheck(fwd, (h, w, b, y, *args, keep, True))
    lp, m, s, _ = fwd(h, w, b, y, *args, keep)
    torch.library.opcheck(bwd, (keep.clone(), g, h, w, b, y, m, s, *args, True,
                                torch.zeros(w.shape), torch.zeros(300)))
    torch.library.opcheck(bwd, (torch.empty(0), g, h, w, b, y, m, s, *args, True,
                                torch.zeros(w.shape), torch.zeros(300)))
    hb, wb = h.bfloat16(), w.bfloat16()
    torch.library.opcheck(fwd, (hb, wb, None, y, -100, 1.0, 0.5, 0.0, True,
                                keep_for(C, h, w, True)))


@pytest.mark.parametrize("threads,N", [(1, 1000), (2, 600), (2, 1000)])
def test_token_blocks_start_on_the_forwards_tiles(C, threads, N):
    """At H = 4096 the backward's d_hidden buffers take the tokens in blocks; a kept backward's
    blocks must start on the forward's tile bounds, or it reads other rows' logits. The tiles of
    a chunk that is not a multiple of 256 rows are balanced (200 rows at N = 600 on 2 threads)
    while the blocks were multiples of 256: d_hidden and d_weight were off by 1e-2, silently."""
    H, V = 4096, 512
    g = torch.Generator().manual_seed(81)
    h, w = torch.randn(N, H, generator=g) * 0.05, torch.randn(V, H, generator=g) * 0.05
    y, gl = torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert C.linear_cpu_bwd_plan(N, V, H, 4, False, False)[1] < N  # blocks of tokens
        _, _, _, d_h, d_w, _ = kept(C, h, w, None, y, gl, (-100, 1.0, 1.0, 0.0), acc_b=False)
    finally:
        torch.set_num_threads(old)
    hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
    lp = torch.log_softmax(hh @ ww.T, -1).gather(1, y[:, None]).squeeze(1)
    (lp * gl.double()).sum().backward()
    for a, e in ((d_h, hh.grad), (d_w, ww.grad)):
        assert (a.double() - e).abs().max() <= 1e-5 * e.abs().max()


def test_backward_refuses_another_calls_tiles(C):
    """The kept buffer records the forward's tile rows; a backward on other rows (so other
    tiles) refuses instead of reading the wrong slots."""
    h, w, _, y = make((300,), 16, 700, torch.float32, seed=82, ignore_frac=0.0)
    args = (-100, 1.0, 1.0, 0.0)
    keep = keep_for(C, h, w)
    _, m, s, _ = ops.get_op("native", "linear_keep_fwd")(h, w, None, y, *args, False, keep)
    with pytest.raises(RuntimeError, match="linear_keep_fwd"):
        ops.get_op("native", "linear_keep_bwd")(keep, torch.ones(200), h[:200], w, None, y[:200],
                                                m[:200], s[:200], *args, False, True,
                                                torch.zeros(w.shape), torch.empty(0))
