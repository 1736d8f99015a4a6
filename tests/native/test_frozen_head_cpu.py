"""The native CPU frozen head (native_linear_frozen_fwd, csrc/cpu/linear_cpu.cpp): per token
tile one sweep of vocabulary blocks forming the forward's per-block statistics, giving the
log-probs (the forward op's bits) and each token's ``u = d logp / d hidden`` at once. Values and d_hidden against the float64 oracle under the
project's rule (through the public API, weight frozen), against the Python chunk loop of
fastdpo.autograd.linear_loss (torch row ops) including -inf / NaN patterns, extreme offsets and
temperatures, ignored rows, batch invariance across batches and thread counts, and opcheck."""

import math
import subprocess
import sys

import pytest
import torch

from fastdpo import ops
from fastdpo import reference as R
from fastdpo.autograd import linear_loss
from fastdpo.linear import linear_token_logps
from test_linear import DTYPES, head_logits, make
from test_linear_cpu import exact_offset_case
from tolerance import assert_rule


def frozen(*args, with_entropy=False):
    """``(logp, row_max, log_sum, u)``, and the entropy with ``with_entropy``."""
    out = ops.get_op("native", "linear_frozen_fwd")(*args, with_entropy)
    return out if with_entropy else out[:4]


def python_loop(h, w, b, y, temperature=1.0, logit_scale=1.0, softcap=0.0):
    """The Python chunk loop (torch row ops), which the native op replaces on CPU."""
    return linear_loss.frozen_head_forward("torch", h, w, b, y, -100, temperature, logit_scale,
                                           softcap)


def cols(C, H=16):
    return C.linear_cpu_plan(1 << 20, H)[1]


def check_frozen(h, w, b, y, *, logit_scale=1.0, softcap=None, temperature=1.0, calls=None):
    """logps and d_hidden of the public API with a frozen head, under the tolerance rule."""
    dtype = h.dtype
    kw = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    hh = h.detach().clone().requires_grad_(True)
    lp = linear_token_logps(hh, w, y, bias=b, backend="native", **kw)
    h64 = h.detach().double().requires_grad_(True)
    lp64 = R.token_logps(head_logits(h64, w.double(), None if b is None else b.double(),
                                     logit_scale=logit_scale, softcap=softcap), y,
                         temperature=temperature)
    hlo = h.detach().clone().requires_grad_(True)
    lplo = R.token_logps(head_logits(hlo, w, b, logit_scale=logit_scale, softcap=softcap), y,
                         temperature=temperature, dtype=dtype)
    assert_rule(lp, lp64, lplo, dtype, what="logps")
    coef = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
    for a, x in ((lp, hh), (lp64, h64), (lplo, hlo)):
        (a * coef.to(a.dtype)).sum().backward()
    assert hh.grad.dtype == dtype and hh.grad.shape == h.shape
    assert_rule(hh.grad, h64.grad, hlo.grad, dtype, what="d_hidden")
    return lp, hh.grad


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the native frozen op made through ops.get_op."""
    seen = []
    get_op = ops.get_op

    def spy(backend, op):
        seen.append((backend, op))
        return get_op(backend, op)

    monkeypatch.setattr(ops, "get_op", spy)
    return seen


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_takes_native_op_and_matches_oracle(C, kernel, dtype, counted):
    V = 2 * cols(C) + 77  # three vocabulary blocks, the last partial
    h, w, b, y = make((600,), 16, V, dtype, seed=50, bias=True)  # three token tiles
    check_frozen(h, w, b, y, softcap=5.0, logit_scale=0.9, temperature=0.7)
    assert ("native", "linear_frozen_fwd") in counted
    check_frozen(h, w, None, y)


def test_matches_python_loop(C, kernel):
    V = 2 * cols(C) + 77
    h, w, b, y = make((300,), 16, V, torch.float32, seed=51, bias=True)
    for opts in ((1.0, 1.0, 0.0), (0.7, 0.9, 5.0), (0.01, 1.0, 0.0)):
        out = frozen(h, w, b, y, -100, *opts, False)
        ref = python_loop(h, w, b, y, *opts)
        for a, e, name in zip(out, ref, ("logp", "row_max", "log_sum", "u")):
            assert a.dtype == torch.float32 and a.shape == e.shape, name
            torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5 * (1 + e.abs().max().item()),
                                       msg=f"{name} {opts}")
        assert torch.equal(out[1], ref[1])  # the max is exact


def test_ignored_rows_are_zero(C):
    h, w, b, y = make((200,), 16, 300, torch.float32, seed=52, ignore_frac=0.5)
    logp, row_max, log_sum, u = frozen(h, w, b, y, -100, 1.0, 1.0, 0.0, False)
    ign = y == -100
    assert ign.any() and (~ign).any()
    for t in (logp, row_max, log_sum):
        assert torch.equal(t[ign], torch.zeros(int(ign.sum())))
    assert torch.equal(u[ign], torch.zeros(int(ign.sum()), 16))
    assert u[~ign].abs().sum() > 0
    y_all = torch.full_like(y, -100)
    out = frozen(h, w, b, y_all, -100, 1.0, 1.0, 0.0, False)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in out)


@pytest.mark.parametrize("temperature", [1.0, 0.01])
@pytest.mark.parametrize("offset", [1e3, -1e3, 1e4, 1e8, -1e8])
def test_extreme_offsets_and_temperature(C, kernel, offset, temperature):
    """Logits exact in fp32 (integer hidden states, weights on a grid no coarser than the
    offset's ulp), so any error is the row math's: it must not grow with the offset."""
    check_frozen(*exact_offset_case(2 * cols(C) + 40, offset, seed=53), temperature=temperature)


def test_masked_blocks_invalid_labels_and_dead_rows(C, kernel):
    """A first block with no finite logit (the running max starts at -inf), a label inside it
    (log-prob -inf), invalid labels (NaN log-prob, no label term in u), a row of only -inf: the
    same values as the Python loop, NaN for NaN."""
    vc = cols(C)
    V = 3 * vc
    h, w, _, y = make((40,), 16, V, torch.float32, seed=54, ignore_frac=0.0)
    y[y < vc] += vc
    y[0], y[1], y[2], y[3] = 3, V + 250, -5, -100
    b = torch.zeros(V)
    b[:vc] = -math.inf
    for bias in (b, torch.full((V,), -math.inf)):
        out = frozen(h, w, bias, y, -100, 1.0, 1.0, 0.0, False)
        ref = python_loop(h, w, bias, y)
        for a, e, name in zip(out, ref, ("logp", "row_max", "log_sum", "u")):
            torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)
    assert out[0][0].isnan() and out[3][0].isnan().all()  # nothing finite: NaN as the loop
    out = frozen(h, w, b, y, -100, 1.0, 1.0, 0.0, False)
    assert out[0][0] == -math.inf and out[0][1].isnan() and out[0][2].isnan()
    assert out[3][:3].isfinite().all()


def test_nan_and_inf_logits_poison_their_row_only(C):
    V = 2 * cols(C)
    h, w, _, y = make((8,), 16, V, torch.float32, seed=55, ignore_frac=0.0)
    h[1, 0] = math.nan
    h[2] = 0.0
    b = torch.zeros(V)
    b[V - 1] = math.inf  # a +inf logit in every row: every row NaN
    out = frozen(h, w, None, y, -100, 1.0, 1.0, 0.0, False)
    ref = python_loop(h, w, None, y)
    for a, e, name in zip(out, ref, ("logp", "row_max", "log_sum", "u")):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)
    assert out[0][1].isnan() and out[0][[0, 2, 3]].isfinite().all()
    out = frozen(h, w, b, y, -100, 1.0, 1.0, 0.0, False)
    assert out[0].isnan().all() and out[3].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant(C, dtype):
    """With batch_invariant a row's outputs are bitwise the same alone, in any batch, at any
    thread count."""
    V = 2 * cols(C) + 9
    h, w, b, y = make((700,), 16, V, dtype, seed=56, bias=True, ignore_frac=0.2)
    threads = torch.get_num_threads()
    try:
        full = frozen(h, w, b, y, -100, 0.8, 1.0, 3.0, True)
        for rows in (slice(0, 1), slice(300, 556)):  # one tile: no parallel region around it
            part = frozen(h[rows], w, b, y[rows], -100, 0.8, 1.0, 3.0, True)
            for a, e in zip(part, full):
                assert torch.equal(a, e[rows])
        torch.set_num_threads(1)
        for rows in (slice(0, 1), slice(5, 6), slice(100, 390), slice(650, 700)):
            part = frozen(h[rows], w, b, y[rows], -100, 0.8, 1.0, 3.0, True)
            for a, e in zip(part, full):
                assert torch.equal(a, e[rows])
    finally:
        torch.set_num_threads(threads)
    perm = torch.randperm(700, generator=torch.Generator().manual_seed(3))
    shuffled = frozen(h[perm], w, b, y[perm], -100, 0.8, 1.0, 3.0, True)
    for a, e in zip(shuffled, full):
        assert torch.equal(a, e[perm])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [(1.0, 1.0, 0.0, False), (0.7, 1.3, 4.0, False),
                                  (1.0, 1.0, 0.0, True)])
def test_statistics_are_the_forwards_bits(C, dtype, opts):
    """The frozen pass forms the forward's per-block statistics and merge: a frozen policy's
    log-probs equal its reference's (the forward op) bit for bit, so they cancel exactly. Many
    vocabulary blocks, a ragged last one, batches from one row to several tiles (a small batch is
    split over the threads: both ops take the same tiles), ignored and invalid labels, a block
    of -inf and a large offset."""
    V = 3 * cols(C) + 37
    for N, seed in ((1, 60), (70, 61), (300, 62), (700, 63)):
        h, w, b, y = make((N,), 16, V, dtype, seed=seed, bias=True, ignore_frac=0.2)
        b = b.clone()
        b[cols(C):2 * cols(C)] = -math.inf  # a whole block of -inf logits
        if N > 2:
            y[1] = V + 5  # invalid: NaN log-prob
            h[2] += 300.0  # a large offset
        for ent in (False, True):
            got = frozen(h, w, b, y, -100, *opts, with_entropy=ent)
            want = ops.get_op("native", "linear_logps_fwd")(h, w, b, y, -100, *opts[:3], 0, V,
                                                           ent, opts[3])
            names = ("logp", "row_max", "log_sum")
            pairs = list(zip(got[:3], want[:3], names))
            if ent:
                pairs.append((got[4], want[3], "entropy"))
            for a, e, name in pairs:
                assert torch.equal(a.nan_to_num(7.0), e.nan_to_num(7.0)), (N, ent, name)
                assert a.isnan().eq(e.isnan()).all(), (N, ent, name)


def test_refusals(C):
    h, w, _, y = make((4,), 16, 50, torch.float32, seed=57)
    with pytest.raises(RuntimeError, match="temperature"):
        frozen(h, w, None, y, -100, 0.0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="weight"):
        frozen(h, w[:, :8], None, y, -100, 1.0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="float64|fp32"):
        frozen(h.double(), w.double(), None, y, -100, 1.0, 1.0, 0.0, False)


def test_opcheck(C):
    h, w, b, y = make((70,), 16, 300, torch.float32, seed=58, bias=True)
    op = ops.get_op("native", "linear_frozen_fwd")
    torch.library.opcheck(op, (h, w, b, y, -100, 0.7, 1.0, 4.0, False))
    torch.library.opcheck(op, (h.bfloat16(), w.bfloat16(), None, y, -100, 1.0, 0.5, 0.0, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (0.0, 0.7), (1e3, 1.0), (0.0, 0.01)])
def test_detached_entropy_from_the_same_sweep(C, kernel, dtype, offset, temperature, counted):
    """return_entropy="detached" (FastDPOTrainer's entropy metrics under LoRA) stays on the
    native frozen op: the entropy comes from the same online softmax, rescaled with the running
    max as online_softmax.h, and meets the float64 oracle under the rule, softcap included."""
    V = 2 * cols(C) + 77
    h, w, b, y = make((600,), 16, V, dtype, seed=52, bias=True)
    b = b + offset
    y[::5] = -100
    for softcap in (None, 5.0):
        kw = dict(softcap=softcap, temperature=temperature, logit_scale=0.9)
        hh = h.detach().clone().requires_grad_(True)
        lp, ent = linear_token_logps(hh, w, y, bias=b, backend="native",
                                     return_entropy="detached", **kw)
        assert not ent.requires_grad
        z64 = head_logits(h.double(), w.double(), b.double(), logit_scale=0.9, softcap=softcap)
        _, ent64 = R.token_logps(z64, y, temperature=temperature, return_entropy=True)
        zlo = head_logits(h, w, b, logit_scale=0.9, softcap=softcap)
        _, entlo = R.token_logps(zlo, y, temperature=temperature, return_entropy=True,
                                 dtype=dtype)
        assert_rule(ent, ent64, entlo, dtype, what="entropy")
        assert bool((ent[y == -100] == 0).all())
    assert counted.count(("native", "linear_frozen_fwd")) == 2


def test_entropy_of_masked_blocks_matches_python_loop(C, kernel):
    """-inf blocks before and after the max (the rescale of an empty state must stay 0)."""
    V = 3 * cols(C)
    h, w, b, y = make((40,), 8, V, torch.float32, seed=53, bias=True)
    b[: cols(C)] = -math.inf                # the first block dead: the state starts empty
    b[2 * cols(C) + 3:2 * cols(C) + 9] = 30.0  # the max grows in the last block
    y[y < cols(C)] = 2 * cols(C) + 4
    got = frozen(h, w, b, y, -100, 0.8, 1.0, 0.0, False, with_entropy=True)
    ref = linear_loss.frozen_head_forward("torch", h, w, b, y, -100, 0.8, 1.0, 0.0,
                                          with_entropy=True)
    torch.testing.assert_close(got[4], ref[4], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-5, atol=2e-5)


def test_half_weight_is_converted_chunk_by_chunk(C):
    """A bf16 head was converted to fp32 whole on every call (2x the head's size, 128 MiB here);
    each thread now converts the chunk it works on."""
    code = """
import torch
from fastdpo import backends, ops
assert backends.status("native").loaded  # loads the extension
from fastdpo.bench.memory import proc_status_kib, reset_peak_rss
g = torch.Generator().manual_seed(0)
V, H, N = 65536, 512, 64
w = (torch.randn(V, H, generator=g) * H ** -0.5).bfloat16()
h = torch.randn(N, H, generator=g).bfloat16()
y = torch.randint(0, V, (N,), generator=g)
op = ops.get_op("native", "linear_frozen_fwd")
op(h[:8], w, None, y[:8], -100, 1.0, 1.0, 0.0, False, False)  # thread pool, first touch
assert reset_peak_rss(), "cannot reset VmHWM"
base = proc_status_kib("VmRSS")
op(h, w, None, y, -100, 1.0, 1.0, 0.0, False, False)
print((proc_status_kib("VmHWM") - base) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split()[-1])
    assert 0 < peak < 32 << 20, f"peak {peak / 2**20:.1f} MiB (an fp32 copy of the head: 128 MiB)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_weight_equals_contiguous(C, dtype):
    """A weight stored transposed (tied embeddings, a view) gives the contiguous weight's bits."""
    h, w, b, y = make((40,), 16, 2 * cols(C) + 9, dtype, seed=57, bias=True)
    wt = w.t().contiguous().t()
    assert not wt.is_contiguous()
    want = frozen(h, w, b, y, -100, 0.9, 1.0, 4.0, False)
    got = frozen(h, wt, b, y, -100, 0.9, 1.0, 4.0, False)
    for a, e in zip(got, want):
        assert torch.equal(a, e)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("threads", [3, 8])
def test_small_batch_splits_the_vocabulary(C, threads, softcap):
    """Fewer token tiles than threads: each tile's vocabulary blocks are split into groups whose
    softmax sums and accumulators merge per row. The statistics stay the forward's bits, and
    u matches the float64 oracle (and the unsplit pass to rounding), -inf blocks and softcap
    included."""
    V = 5 * cols(C) + 3
    h, w, b, y = make((70,), 16, V, torch.float32, seed=64, bias=True, ignore_frac=0.0)
    b = b.clone()
    b[:cols(C)] = -math.inf  # without softcap a block of -inf: a group's first, k = 0, alpha = 0
    y = torch.where(y < cols(C), y + cols(C), y)  # no label there (its log-prob would be -inf)
    opts = (-100, 0.8, 1.0, softcap, False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = frozen(h, w, b, y, *opts, with_entropy=True)
        torch.set_num_threads(threads)
        split = frozen(h, w, b, y, *opts, with_entropy=True)
        want = ops.get_op("native", "linear_logps_fwd")(h, w, b, y, *opts[:4], 0, V, True, False)
        check_frozen(h, w, b, y, softcap=softcap or None, temperature=0.8)
    finally:
        torch.set_num_threads(old)
    for a, e in zip(split[:3] + (split[4],), want):
        assert torch.equal(a, e)
    torch.testing.assert_close(split[3], one[3], rtol=1e-5, atol=1e-6)
