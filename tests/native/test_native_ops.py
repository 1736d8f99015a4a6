"""native_logps_fwd / native_logps_bwd on CPU: opcheck, both CPU kernels (AVX2 and scalar) against a
float64 formulation of the row contract, bad labels, masked logits, in-place backward, and the
argument checks' messages."""

import math

import pytest
import torch

from fastdpo import ops


def fwd(*args):
    return ops.get_op("native", "logps_fwd")(*args)


def bwd(*args):
    return ops.get_op("native", "logps_bwd")(*args)


def ref_fwd(x, labels, ignore_index, temperature, vocab_start, vocab_total):
    """float64 row contract: (logp, row_max, log_sum, entropy)."""
    x = x.double()
    row_max = x.amax(-1)
    ref = torch.where(row_max == -math.inf, 0.0, row_max).unsqueeze(-1)
    d = (x - ref) / temperature
    log_sum = torch.logsumexp(d, -1)
    p = torch.exp(d - log_sum.unsqueeze(-1))
    ent = log_sum - torch.where(p > 0, p * d, 0.0).sum(-1)
    lab = labels.long()
    active = lab != ignore_index
    valid = (lab >= 0) & (lab < vocab_total)
    local = lab - vocab_start
    here = valid & (local >= 0) & (local < x.shape[-1])
    dl = d.gather(-1, torch.where(here, local, 0).unsqueeze(-1)).squeeze(-1)
    off = -ref.squeeze(-1) / temperature  # a label logit of 0
    logp = torch.where(valid, torch.where(here, dl, off) - log_sum, float("nan"))
    zero = torch.zeros_like(log_sum)
    return tuple(torch.where(active, t, zero) for t in (logp, row_max, log_sum, ent))


def ref_bwd(g, ge, x, labels, row_max, log_sum, ent, ignore_index, temperature, vocab_start):
    """float64 gradient from the given row statistics (any consistent pair)."""
    x = x.double()
    row_max, log_sum = row_max.double().unsqueeze(-1), log_sum.double().unsqueeze(-1)
    ref = torch.where(row_max == -math.inf, 0.0, row_max)
    g = g.double().unsqueeze(-1)
    logp_all = (x - ref) / temperature - log_sum
    p = torch.exp(logp_all)
    lab = labels.long()
    local = lab - vocab_start
    onehot = torch.zeros_like(x)
    here = (local >= 0) & (local < x.shape[-1]) & (lab != ignore_index)
    onehot.scatter_(-1, torch.where(here, local, 0).unsqueeze(-1), here.unsqueeze(-1).double())
    d = g * (onehot - p)
    if ge is not None:
        d = d - ge.double().unsqueeze(-1) * p * (logp_all + ent.double().unsqueeze(-1))
    d = d / temperature
    return torch.where((lab != ignore_index).unsqueeze(-1), d, 0.0)


def sample(B, T, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    return x, labels


def assert_fwd_close(out, ref, atol):
    for name, a, b in zip(("logp", "row_max", "log_sum", "entropy"), out, ref):
        a = a.double()
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern"
        if a.numel() == 0:
            continue
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name}: inf pattern"
        a, b = a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)
        err = ((a - b).abs() / (1 + b.abs())).max().item()
        assert err <= atol, f"{name}: {err}"


DTYPE_TOL = {torch.float32: (1e-5, 2e-6), torch.bfloat16: (1e-5, 8e-3), torch.float16: (1e-5, 1e-3)}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("V", [1, 7, 15, 16, 17, 33, 2047, 2048, 2049, 4100])
def test_matches_float64(kernel, dtype, V):
    x, labels = sample(2, 3, V, dtype, seed=V)
    labels[1, 2] = V + 3  # invalid: NaN
    fwd_tol, bwd_tol = DTYPE_TOL[dtype]
    for temperature in (1.0, 0.7):
        for ent in (False, True):
            out = fwd(x, labels, -100, temperature, 0, V, ent)
            ref = ref_fwd(x, labels, -100, temperature, 0, V)
            assert all(t.dtype == torch.float32 and t.is_contiguous() for t in out)
            if not ent:
                assert out[3].shape == (0,)
                ref = (*ref[:3], out[3].double())
            assert_fwd_close(out, ref, fwd_tol)
        logp, row_max, log_sum, entropy = out
        gen = torch.Generator().manual_seed(1)
        g, ge = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
        for gent in (None, ge):
            grad = torch.full_like(x, 5.0)
            ent_in = entropy if gent is not None else None
            bwd(g, gent, x, labels, row_max, log_sum, ent_in, -100, temperature, 0, V, grad)
            want = ref_bwd(g, gent, x, labels, row_max, log_sum, entropy, -100, temperature, 0)
            err = ((grad.double() - want).abs() / (want.abs() + g.abs().max() + 1)).max().item()
            assert err <= bwd_tol, err
            inplace = x.clone()
            bwd(g, gent, inplace, labels, row_max, log_sum, ent_in, -100, temperature, 0, V,
                inplace)
            assert torch.equal(inplace, grad)  # in place gives the very same bits


def test_real_vocabulary_rows(kernel):
    x, labels = sample(1, 3, 128256, torch.float32, scale=2.0)
    out = fwd(x, labels, -100, 1.0, 0, 128256, True)
    assert_fwd_close(out, ref_fwd(x, labels, -100, 1.0, 0, 128256), 2e-6)
    g = torch.randn(1, 3)
    bwd(g, None, x, labels, out[1], out[2], None, -100, 1.0, 0, 128256, x)
    want = ref_bwd(g, None, sample(1, 3, 128256, torch.float32, scale=2.0)[0], labels, out[1],
                   out[2], None, -100, 1.0, 0)
    assert (x.double() - want).abs().max().item() < 1e-6


def test_vocab_shard(kernel):
    # This shard holds global ids [40, 70) of 100; labels elsewhere count a label logit of 0.
    x, _ = sample(2, 4, 30, torch.float32)
    labels = torch.tensor([[-100, 5, 40, 69], [70, 99, 55, 100]])
    out = fwd(x, labels, -100, 1.0, 40, 100, True)
    ref = ref_fwd(x, labels, -100, 1.0, 40, 100)
    assert_fwd_close(out, ref, 2e-6)
    lse = out[1] + out[2]
    assert out[0][0, 1] == -lse[0, 1] and out[0][1, 0] == -lse[1, 0]  # off-shard: -lse
    assert math.isnan(out[0][1, 3])
    g = torch.randn(2, 4)
    grad = torch.empty_like(x)
    bwd(g, None, x, labels, out[1], out[2], None, -100, 1.0, 40, 100, grad)
    want = ref_bwd(g, None, x, labels, out[1], out[2], None, -100, 1.0, 40)
    assert (grad.double() - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_bad_labels_give_nan_without_reading_out_of_bounds(kernel, label_dtype):
    V = 37
    x, _ = sample(1, 6, V, torch.float32)
    big = 2**31 - 1 if label_dtype == torch.int32 else 2**62
    labels = torch.tensor([[V, -1, -(2**31), big, 3, -100]], dtype=label_dtype)
    logp, m, ls, ent = fwd(x, labels, -100, 1.0, 0, V, True)
    assert torch.isnan(logp[0, :4]).all() and not torch.isnan(logp[0, 4:]).any()
    for t in (m, ls, ent):
        assert torch.isfinite(t[0, :5]).all() and t[0, 5] == 0
    assert logp[0, 5] == 0
    grad = torch.empty_like(x)
    bwd(torch.ones(1, 6), None, x, labels, m, ls, None, -100, 1.0, 0, V, grad)
    assert torch.isfinite(grad).all()
    # A bad label only loses the label term: the softmax part is still there.
    want = ref_bwd(torch.ones(1, 6), None, x, labels.long().clamp(-50, V + 5), m, ls, None, -100,
                   1.0, 0)
    assert (grad[0, :4].double() - want[0, :4]).abs().max() < 1e-6
    assert torch.equal(grad[0, 5], torch.zeros(V))


def test_ignored_rows_are_skipped(kernel):
    x, labels = sample(2, 3, 20, torch.float32)
    x[0, 0] = float("nan")  # row 0 is ignored: never read
    labels[0, 0] = 7
    out = fwd(x, labels, 7, 1.0, 0, 20, True)
    assert all(t[0, 0] == 0 for t in out)
    grad = torch.full_like(x, 3.0)
    bwd(torch.ones(2, 3), torch.ones(2, 3), x, labels, out[1], out[2], out[3], 7, 1.0, 0, 20, grad)
    assert torch.equal(grad[0, 0], torch.zeros(20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_logits(kernel, dtype):
    V = 50
    x, labels = sample(1, 3, V, dtype)
    x[0, 0, 10:] = float("-inf")
    x[0, 1] = float("-inf")  # fully masked row
    labels[0] = torch.tensor([3, 3, 4])
    logp, m, ls, ent = fwd(x, labels, -100, 1.0, 0, V, True)
    ref = ref_fwd(x, labels, -100, 1.0, 0, V)
    assert torch.isfinite(logp[0, 0]) and abs(logp[0, 0] - ref[0][0, 0]) < 1e-5
    assert abs(ent[0, 0] - ref[3][0, 0]) < 1e-5
    assert m[0, 1] == -math.inf and ls[0, 1] == -math.inf and math.isnan(ent[0, 1])
    grad = torch.empty_like(x)
    bwd(torch.ones(1, 3), torch.ones(1, 3), x, labels, m, ls, ent, -100, 1.0, 0, V, grad)
    assert torch.equal(grad[0, 0, 10:], torch.zeros(V - 10, dtype=dtype))
    assert torch.isfinite(grad[0, 0]).all() and torch.isfinite(grad[0, 2]).all()


def test_plus_inf_logit(kernel):
    x, labels = sample(1, 2, 9, torch.float32)
    x[0, :, 4] = float("inf")
    labels[0] = torch.tensor([4, 1])
    logp, m, ls, ent = fwd(x, labels, -100, 1.0, 0, 9, True)
    # As log_softmax: the whole row is NaN, whichever the label.
    assert torch.isnan(ls).all() and torch.isnan(ent).all() and torch.isnan(logp).all()


def test_strided_inputs(kernel):
    big, labels = sample(3, 7, 50, torch.bfloat16, seed=5)
    x = big.transpose(0, 1)[:, :, 3:41]  # strided batch and time, unit vocabulary stride
    lab = labels.t().clamp(max=37).to(torch.int32)[:, ::1]
    assert not x.is_contiguous()
    out = fwd(x, lab, -100, 1.0, 0, 38, True)
    assert_fwd_close(out, ref_fwd(x, lab, -100, 1.0, 0, 38), 2e-6)
    g = torch.randn(3, 7).t()  # strided grad_logp and lse are accepted too
    assert not g.is_contiguous()
    grad_full = torch.zeros(3, 7, 45, dtype=torch.bfloat16)
    grad = grad_full.transpose(0, 1)[:, :, 2:40]
    bwd(g, None, x, lab, out[1].t().contiguous().t(), out[2], None, -100, 1.0, 0, 38, grad)
    want = ref_bwd(g, None, x, lab, out[1], out[2], None, -100, 1.0, 0)
    assert (grad.double() - want).abs().max() < 1e-2
    assert torch.equal(grad_full[:, :, :2], torch.zeros(3, 7, 2, dtype=torch.bfloat16))


def test_empty_inputs(kernel):
    for B, T, V in ((0, 3, 5), (2, 0, 5)):
        x, labels = torch.randn(B, T, V), torch.zeros(B, T, dtype=torch.long)
        logp, m, ls, ent = fwd(x, labels, -100, 1.0, 0, V, True)
        assert all(t.shape == (B, T) for t in (logp, m, ls, ent))
        bwd(logp, None, x, labels, m, ls, None, -100, 1.0, 0, V, torch.empty_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(kernel, dtype):
    x, labels = sample(2, 4, 19, dtype)
    for ent in (False, True):
        torch.library.opcheck(ops.get_op("native", "logps_fwd"), (x, labels, -100, 0.9, 0, 19, ent))
    logp, m, ls, entropy = fwd(x, labels, -100, 0.9, 0, 19, True)
    g = torch.randn_like(logp)
    torch.library.opcheck(ops.get_op("native", "logps_bwd"),
                          (g, torch.randn_like(logp), x, labels, m, ls, entropy, -100, 0.9, 0, 19,
                           torch.empty_like(x)))
    torch.library.opcheck(ops.get_op("native", "logps_bwd"),
                          (g[:, :-1], None, x[:, 1:], labels[:, :-1], m[:, :-1], ls[:, :-1], None,
                           -100, 0.9, 0, 19, torch.empty_like(x)[:, 1:]))


def test_public_api_gradient_matches_torch_backend():
    import fastdpo

    x, labels = sample(2, 6, 45, torch.float32, seed=3)
    out = {}
    for be in ("native", "torch"):
        xx = x.clone().requires_grad_(True)
        lp = fastdpo.sequence_logps(xx, labels, backend=be, shift=True, temperature=0.8)
        lp.sum().backward()
        out[be] = (lp.detach(), xx.grad)
    torch.testing.assert_close(out["native"][0], out["torch"][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["native"][1], out["torch"][1], atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ argument checks


def check_error(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_forward_argument_messages(C):
    x, labels = sample(2, 3, 11, torch.float32)
    check_error("logits must be 3-D", fwd, x[0], labels, -100, 1.0, 0, 11, False)
    check_error("native backend takes fp32/bf16/fp16 logits", fwd, x.int(), labels, -100, 1.0, 0,
                11, False)
    check_error("native backend takes fp32/bf16/fp16 logits, got Double", fwd, x.double(),
                labels, -100, 1.0, 0, 11, False)
    check_error("outside the range fp32 kernels can scale by", fwd, x, labels, -100, 1e-300, 0,
                11, False)
    check_error("logits must have unit stride", fwd, x.transpose(1, 2), labels, -100, 1.0, 0, 11,
                False)
    check_error("labels must be int64 or int32", fwd, x, labels.float(), -100, 1.0, 0, 11, False)
    check_error(r"labels must have shape \(B, T\)", fwd, x, labels[:, :2], -100, 1.0, 0, 11,
                False)
    check_error("temperature must be a finite positive", fwd, x, labels, -100, 0.0, 0, 11, False)
    check_error("temperature must be a finite positive", fwd, x, labels, -100, float("nan"), 0, 11,
                False)
    check_error("vocab_start must be >= 0", fwd, x, labels, -100, 1.0, -1, 11, False)
    check_error("vocab_total must be >= 0", fwd, x, labels, -100, 1.0, 0, -11, False)


def test_backward_argument_messages(C):
    x, labels = sample(2, 3, 11, torch.float32)
    logp, m, ls, ent = fwd(x, labels, -100, 1.0, 0, 11, True)
    g = torch.ones_like(logp)
    base = [g, None, x, labels, m, ls, None, -100, 1.0, 0, 11, torch.empty_like(x)]

    def with_(**kw):
        names = ["grad_logp", "grad_entropy", "logits", "labels", "row_max", "log_sum", "entropy",
                 "ignore_index", "temperature", "vocab_start", "vocab_total", "grad_logits"]
        args = list(base)
        for k, v in kw.items():
            args[names.index(k)] = v
        return args

    check_error("grad_logp must be float32", bwd, *with_(grad_logp=g.double()))
    check_error(r"grad_logp must have shape \(B, T\)", bwd, *with_(grad_logp=g[:1]))
    check_error("row_max must be float32", bwd, *with_(row_max=m.half()))
    check_error("native backend takes fp32/bf16/fp16 logits", bwd,
                *with_(logits=x.double(), grad_logits=torch.empty_like(x, dtype=torch.float64)))
    check_error(r"log_sum must have shape \(B, T\)", bwd, *with_(log_sum=ls[:, :1]))
    check_error("temperature must be a finite positive", bwd, *with_(temperature=-1.0))
    check_error("entropy is required when grad_entropy is given", bwd, *with_(grad_entropy=g))
    check_error(r"entropy must have shape \(B, T\)", bwd,
                *with_(grad_entropy=g, entropy=ent[:, :1]))
    check_error("grad_logits must have the logits' dtype", bwd,
                *with_(grad_logits=torch.empty_like(x, dtype=torch.bfloat16)))
    check_error("grad_logits must have the logits' shape", bwd,
                *with_(grad_logits=torch.empty(2, 3, 12)))
    check_error("grad_logits must have unit stride", bwd,
                *with_(grad_logits=torch.empty(2, 11, 3).transpose(1, 2)))
    storage = torch.randn(2 * 3 * 11 + 5)
    check_error("grad_logits partially overlaps logits", bwd,
                *with_(logits=storage[:66].view(2, 3, 11),
                       grad_logits=storage[5:71].view(2, 3, 11)))
    check_error("different strides", bwd,
                *with_(logits=storage[:66].view(2, 3, 11),
                       grad_logits=storage[:66].view(3, 2, 11).transpose(0, 1)))


def test_cpu_kernel_switch_messages(C):
    with pytest.raises(RuntimeError, match="must be 'auto' or 'generic'"):
        C.set_cpu_kernel("fast")
