"""The core API through every backend, against the float64 oracle (fastdpo.reference)."""

import pytest
import torch

import fastdpo
from fastdpo import reference as R
from tolerance import assert_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(B, T, V, dtype, *, seed=0, ignore_frac=0.25, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore_frac] = -100
    return logits, labels


def check_token(backend, logits, labels, *, grad=True, **kw):
    """Forward (logps, entropy) and gradient of a random projection, held to the tolerance rule."""
    dtype = logits.dtype
    x = logits.clone().requires_grad_(grad)
    lp, ent = fastdpo.token_logps(x, labels, return_entropy=True, backend=backend, **kw)
    x64 = logits.detach().double().requires_grad_(grad)
    lp64, ent64 = R.token_logps(x64, labels, return_entropy=True, **kw)
    xlo = logits.detach().clone().requires_grad_(grad)
    lplo, entlo = R.token_logps(xlo, labels, return_entropy=True, dtype=dtype, **kw)
    assert lp.dtype == torch.float32
    assert_rule(lp, lp64, lplo, dtype, what="logps")
    assert_rule(ent, ent64, entlo, dtype, what="entropy")
    if not grad:
        return
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    ((lp * w1).sum() + (ent * w2).sum()).backward()
    ((lp64 * w1.double()).sum() + (ent64 * w2.double()).sum()).backward()
    ((lplo * w1.to(lplo.dtype)).sum() + (entlo * w2.to(entlo.dtype)).sum()).backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_rule(x.grad, x64.grad, xlo.grad, dtype, what="grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 33), (1, 1, 1), (3, 2, 1), (1, 3, 130), (2, 3, 257)])
def test_token_logps_matches_reference(backend, dtype, shape):
    logits, labels = make(*shape, dtype)
    check_token(backend, logits, labels)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_options(backend, shift, temperature):
    logits, labels = make(2, 6, 45, torch.float32, seed=3)
    check_token(backend, logits, labels, shift=shift, temperature=temperature)


def test_two_dim_and_int32_labels(backend):
    logits, labels = make(1, 9, 40, torch.float32, seed=4)
    check_token(backend, logits[0], labels[0].to(torch.int32), shift=True)


def test_non_contiguous_inputs(backend):
    big, labels = make(3, 7, 50, torch.bfloat16, seed=5)
    logits = big.transpose(0, 1)[:, :, 3:41]  # strided batch and time, unit vocab stride
    lab = labels.t().clamp(max=37)
    assert not logits.is_contiguous()
    check_token(backend, logits, lab, shift=True)


def test_reference_pass_saves_nothing(backend):
    logits, labels = make(2, 4, 30, torch.float32)
    logits.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = fastdpo.sequence_logps(logits, labels, backend=backend)
    assert not out.requires_grad and saved == []


def test_policy_pass_saves_only_logits_and_tokens(backend):
    logits, labels = make(2, 4, 30, torch.float32)
    logits.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastdpo.sequence_logps(logits, labels, backend=backend)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()  # the caller's own logits
    assert sum(t.numel() for t in saved if t.data_ptr() != logits.data_ptr()) <= 8 * labels.numel()


@pytest.mark.parametrize("shift", [False, True])
def test_inplace_backward(backend, shift):
    logits, labels = make(2, 5, 37, torch.float32, seed=6)
    a = logits.clone().requires_grad_(True)
    fastdpo.sequence_logps(a, labels, shift=shift, backend=backend).sum().backward()
    leaf = logits.clone().requires_grad_(True)
    b = leaf * 1.0  # a non-leaf whose storage the backward may overwrite
    ptr = b.data_ptr()
    fastdpo.sequence_logps(b, labels, shift=shift, backend=backend,
                           inplace_backward=True).sum().backward()
    assert b.data_ptr() == ptr
    torch.testing.assert_close(leaf.grad, a.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), a.grad, rtol=1e-6, atol=1e-7)  # gradient in its storage


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps(backend, average):
    logits, labels = make(3, 6, 29, torch.float32, seed=7)
    labels[1] = -100  # an all-ignored sequence: 0 and zero gradient, never NaN
    w = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    x = logits.clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels, token_weights=w, average=average, shift=True,
                                 backend=backend)
    x64 = logits.double().requires_grad_(True)
    ref = R.sequence_logps(x64, labels, token_weights=w, average=average, shift=True)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert out[1].item() == 0.0
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert torch.all(x.grad[1] == 0)


@pytest.mark.parametrize("shift", [False, True])
def test_cu_seqlens(backend, shift):
    logits, labels = make(1, 11, 23, torch.float32, seed=8, ignore_frac=0.1)
    cu = torch.tensor([0, 4, 4, 9, 11], dtype=torch.int32)
    x = logits.clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels, cu_seqlens=cu, shift=shift, backend=backend)
    x64 = logits.double().requires_grad_(True)
    ref = R.sequence_logps(x64, labels, cu_seqlens=cu, shift=shift)
    assert out.shape == (4,)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    flat = fastdpo.sequence_logps(logits[0], labels[0], cu_seqlens=cu, shift=shift,
                                  backend=backend)
    torch.testing.assert_close(flat, out.detach())


def test_packed_without_cu_seqlens_is_scalar(backend):
    logits, labels = make(1, 6, 20, torch.float32)
    out = fastdpo.sequence_logps(logits[0], labels[0], backend=backend)
    assert out.dim() == 0
    torch.testing.assert_close(out.double(), R.sequence_logps(logits[0], labels[0]),
                               rtol=1e-5, atol=1e-5)


def test_special_values(backend):
    logits, labels = make(1, 6, 16, torch.float32, ignore_frac=0.0)
    logits[0, 0, 3] = float("nan")
    logits[0, 1, 5] = float("inf")
    logits[0, 2, :8] = float("-inf")  # masked vocabulary entries are legitimate
    labels[0, 2] = 10
    logits[0, 3] = 7.0  # all-equal row
    lp, ent = fastdpo.token_logps(logits, labels, return_entropy=True, backend=backend)
    assert torch.isnan(lp[0, 0]) and torch.isnan(lp[0, 1])
    assert torch.isfinite(lp[0, 2:]).all()
    torch.testing.assert_close(lp[0, 3], torch.tensor(-torch.log(torch.tensor(16.0)).item()))
    torch.testing.assert_close(ent[0, 3], torch.log(torch.tensor(16.0)))
    ref = R.token_logps(logits, labels, return_entropy=True)
    torch.testing.assert_close(lp[0, 2:].double(), ref[0][0, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent[0, 2:].double(), ref[1][0, 2:], rtol=1e-5, atol=1e-5)


def test_out_of_range_label_unchecked_gives_nan(backend):
    logits, labels = make(1, 4, 16, torch.float32, ignore_frac=0.0)
    labels[0, 1], labels[0, 2] = 16, -7
    x = logits.clone().requires_grad_(True)
    lp = fastdpo.token_logps(x, labels, backend=backend, validate=False)
    assert torch.isnan(lp[0, 1:3]).all() and torch.isfinite(lp[0, [0, 3]]).all()
    lp[0, [0, 3]].sum().backward()
    assert torch.isfinite(x.grad).all()


def test_all_ignored_rows_zero(backend):
    logits, labels = make(2, 3, 10, torch.float32)
    labels[:] = -100
    x = logits.clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels, average=True, backend=backend)
    assert torch.equal(out, torch.zeros(2))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_vocab_shard_semantics(backend):
    """The row op on a shard at vocab_start: (x_label - row_max) c - log_sum for a local label,
    -lse for a label elsewhere, NaN outside [0, vocab_total); row_max / log_sum of the shard."""
    from fastdpo import ops

    logits, labels = make(1, 5, 12, torch.float32, ignore_frac=0.0)
    labels[0] = torch.tensor([0, 11, 12, 20, 24])
    lp, m, s, _ = ops.get_op(backend, "logps_fwd")(logits, labels, -100, 0.5, 12, 24, False)
    x = logits[0].double() / 0.5
    lse = torch.logsumexp(x, -1)
    torch.testing.assert_close(m[0].double(), logits[0].double().amax(-1))
    torch.testing.assert_close(m[0].double() / 0.5 + s[0].double(), lse, rtol=1e-6, atol=1e-5)
    local = (labels[0] >= 12) & (labels[0] < 24)
    zl = torch.where(local, x.gather(-1, (labels[0] - 12).clamp(0, 11)[:, None])[:, 0], 0.0)
    want = torch.where(labels[0] < 24, zl - lse, float("nan"))
    torch.testing.assert_close(lp[0].double(), want, rtol=1e-6, atol=1e-5, equal_nan=True)


def test_gradcheck_float64():
    logits, labels = make(2, 3, 7, torch.float64, seed=9)
    w = torch.rand(2, 3, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)

    def f(x):
        lp, ent = fastdpo.token_logps(x, labels, return_entropy=True, temperature=0.8, shift=True,
                                      backend="torch")
        return lp, ent, fastdpo.sequence_logps(x, labels, token_weights=w, average=True,
                                               backend="torch")

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_logps_do_not_depend_on_return_entropy(backend, temperature):
    """Bitwise: a trainer asking for the entropy in the policy pass only must see the same log-probs
    as the reference pass (an exact tie at step 0), so no variant may round differently."""
    g = torch.Generator().manual_seed(0)
    for V in (36, 3600):
        x = torch.randn(40, V, generator=g) * 3
        y = torch.randint(0, V, (40,), generator=g)
        a = fastdpo.token_logps(x, y, temperature=temperature, backend=backend)
        b, _ = fastdpo.token_logps(x, y, temperature=temperature, return_entropy=True,
                                   backend=backend)
        assert torch.equal(a, b)
