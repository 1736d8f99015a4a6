"""Precision of the native CPU kernels at extreme inputs, against float64 and eager fp32 with the
tolerance rule of tests/tolerance.py (tight atol: every output is computed in fp32): a logit offset
of 1000, a constant row of 1e8, temperature 0.01, logits near the largest finite value, and the
special rows (all -inf, +inf, NaN, ignored). Both CPU kernel sets, fp32/bf16/fp16 logits."""

import math

import pytest
import torch

from fastdpo import ops
from tolerance import ATOL, assert_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TIGHT = 1e-6  # atol of fp32 results: eager-level, where x * c - lse loses ~2e-5 at offset 1000


def fwd(*args):
    return ops.get_op("native", "logps_fwd")(*args)


def bwd(*args):
    return ops.get_op("native", "logps_bwd")(*args)


def eager(x, labels, temperature, dtype):
    """log_softmax(x / temperature) by autograd in `dtype`: (logp, lse, entropy, d logp . g)."""
    x = x.to(dtype).requires_grad_(True)
    logq = torch.log_softmax(x / temperature, -1)
    logp = logq.gather(-1, labels[..., None]).squeeze(-1)
    lse = torch.logsumexp(x.detach() / temperature, -1)
    ent = -(torch.where(logq > -math.inf, logq.exp() * logq, 0.0)).sum(-1)
    g = torch.linspace(-1.5, 2.0, labels.numel()).view(labels.shape)
    (logp * g.to(dtype)).sum().backward()
    return logp.detach(), lse, ent.detach(), x.grad, g


def native(x, labels, temperature, g, inplace=False):
    V = x.shape[-1]
    logp, m, ls, ent = fwd(x, labels, -100, temperature, 0, V, True)
    grad = x.clone() if inplace else torch.empty_like(x)
    src = grad if inplace else x
    bwd(g, None, src, labels, m, ls, None, -100, temperature, 0, V, grad)
    return logp, m, ls, ent, grad


def check_against_eager(x, labels, temperature, dtype, grad_atol=None):
    """Every output of the native ops by the rule, against float64 and eager fp32 on the same
    (dtype-rounded) logits; the gradient against eager fp32 rounded to the storage dtype."""
    x = x.to(dtype)
    ref = eager(x, labels, temperature, torch.float64)
    e32 = eager(x, labels, temperature, torch.float32)
    logp, m, ls, ent, grad = native(x, labels, temperature, ref[4])
    assert torch.equal(m, x.float().amax(-1))  # the raw max, exactly
    lse = m.double() / temperature + ls.double()
    for what, out, r, e in (("logp", logp, ref[0], e32[0]), ("lse", lse, ref[1], e32[1]),
                            ("entropy", ent, ref[2], e32[2])):
        assert_rule(out, r, e, torch.float32, atol=TIGHT, what=what)
    atol = grad_atol or (TIGHT if dtype == torch.float32 else ATOL[dtype])
    assert_rule(grad, ref[3], e32[3].to(dtype), dtype, atol=atol, what="grad")
    return ref, grad


def sample(B, T, V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale, torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logit_offset_1000(kernel, dtype, temperature):
    x, labels = sample(3, 5, 1031)
    check_against_eager(x + 1000.0, labels, temperature, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_temperature_0_01(kernel, dtype, offset):
    x, labels = sample(3, 5, 777, seed=1)
    ref, grad = check_against_eager(x + offset, labels, 0.01, dtype)
    if dtype == torch.float32:
        # The gradient carries c = 100: fp32 rounding of log p gives ~c * 1e-7. Forming
        # x * c - lse instead gave ~2e-3 here.
        err = (grad.double() - ref[3]).abs().max().item()
        assert err < 100 * 2e-7 * ref[4].abs().max().item(), err


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_row(kernel, dtype):
    V = 40
    big = 1e8 if dtype != torch.float16 else 6e4  # fp16 tops out at 65504
    x = torch.full((2, 3, V), big, dtype=dtype)
    labels = torch.arange(6).view(2, 3)
    g = torch.ones(2, 3)
    logp, m, ls, ent, grad = native(x, labels, 1.0, g)
    torch.testing.assert_close(logp, torch.full_like(logp, -math.log(V)), atol=1e-6, rtol=0)
    assert logp[0, 0].item() == pytest.approx(-3.6888794, abs=1e-6)
    assert torch.equal(m, torch.full_like(m, float(x[0, 0, 0])))
    torch.testing.assert_close(ent, torch.full_like(ent, math.log(V)), atol=1e-6, rtol=0)
    # d logp / dx = onehot - 1/V: sums to 0 over the row.
    assert grad.float().sum(-1).abs().max().item() < (1e-6 if dtype == torch.float32 else 1e-2)
    want = torch.full((2, 3, V), -1.0 / V)
    want.scatter_(-1, labels[..., None], 1.0 - 1.0 / V)
    torch.testing.assert_close(grad.float(), want.to(dtype).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, math.e])
def test_logits_near_the_largest_finite(kernel, dtype, temperature):
    big = torch.finfo(dtype).max * 0.9
    x, _ = sample(2, 4, 37, seed=2)
    x[:, :, :4] = torch.tensor([big, 0.8 * big, -big, -0.3 * big])
    labels = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 5]])
    x = x.to(dtype)
    ref = eager(x, labels, temperature, torch.float64)
    e32 = eager(x, labels, temperature, torch.float32)
    logp, m, ls, ent, grad = native(x, labels, temperature, ref[4])
    for t in (m, ls, ent, grad):
        assert torch.isfinite(t).all()
    # Where eager overflows (x / T, or x - max) it gives no bound: hold those entries to float64.
    ok = torch.isfinite(e32[0])
    assert ok.sum() >= (6 if temperature >= 1 else 0)
    fits = ref[0].abs() < torch.finfo(torch.float32).max  # logp representable in fp32
    assert torch.isfinite(logp[fits]).all() and (logp[~fits] == -math.inf).all()
    for what, out, r, e in (("logp", logp[fits], ref[0][fits], e32[0][fits]),
                            ("entropy", ent, ref[2], e32[2])):
        assert_rule(out, r, torch.where(torch.isfinite(e), e, r), torch.float32, atol=TIGHT,
                    what=what)
    e_grad = torch.where(torch.isfinite(e32[3]), e32[3].double(), ref[3]).to(dtype)
    assert_rule(grad, ref[3], e_grad, dtype, atol=TIGHT if dtype == torch.float32 else ATOL[dtype],
                what="grad")


def test_row_spanning_more_than_the_fp32_range(kernel):
    # x - max overflows here; (x - max) / T does not, and eager (x / T first) is finite.
    x = torch.tensor([[[3.0e38, -3.0e38, 1.0, 2.0e38]]])
    for temperature in (math.e, 2.0):
        logp = fwd(x, torch.tensor([[1]]), -100, temperature, 0, 4, False)[0]
        want = (-3.0e38 - 3.0e38) / temperature  # log_sum is 0: one term dominates
        assert logp.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_rows(kernel, dtype):
    V = 21
    x, labels = sample(1, 6, V, seed=3)
    x[0, 0] = -math.inf                  # nothing to normalise
    x[0, 1, 5] = math.inf                # +inf: NaN row
    x[0, 2, 7] = math.nan                # NaN: NaN row
    x[0, 3, :] = -math.inf               # all -inf but ignored
    x[0, 4, ::2] = -math.inf             # masked entries
    labels[0, 3] = -100
    x = x.to(dtype)
    logp, m, ls, ent = fwd(x, labels, -100, 0.8, 0, V, True)
    assert m[0, 0] == -math.inf and ls[0, 0] == -math.inf and math.isnan(ent[0, 0])
    assert math.isnan(logp[0, 0])        # as log_softmax of an all -inf row
    assert m[0, 1] == math.inf and math.isnan(m[0, 2])  # as amax
    for t in (logp, ls, ent):
        assert torch.isnan(t[0, 1:3]).all()
    assert all(t[0, 3] == 0 for t in (logp, m, ls, ent))
    assert torch.isfinite(torch.stack([logp[0, 4:], m[0, 4:], ls[0, 4:], ent[0, 4:]])).all()
    grad = torch.full_like(x, 7.0)
    bwd(torch.ones(1, 6), torch.ones(1, 6), x, labels, m, ls, ent, -100, 0.8, 0, V, grad)
    assert torch.isnan(grad[0, 1:3]).all()
    assert torch.equal(grad[0, 3], torch.zeros(V, dtype=dtype))  # ignored: zeros, never read
    assert torch.equal(grad[0, 4, ::2], torch.zeros(11, dtype=dtype))  # masked: exactly 0
    assert torch.isfinite(grad[0, 4:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_in_place_backward_reads_before_writing(kernel, dtype, temperature):
    x, labels = sample(2, 3, 1000, seed=4)
    x = (x + 1000.0).to(dtype)
    g = torch.randn(2, 3)
    out_of_place = native(x, labels, temperature, g)[4]
    in_place = native(x, labels, temperature, g, inplace=True)[4]
    assert torch.equal(in_place, out_of_place)
