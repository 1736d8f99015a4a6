"""Silently wrong results found by the adversarial API review; each test failed before its fix."""

import math

import pytest
import torch

import fastdpo
from fastdpo import reference as R


def data(B=2, T=6, V=11, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    return logits, labels, hidden, weight


def seq_fns(backend):
    """sequence_logps over logits and over hidden states (the fused head), same data."""
    _, _, hidden, weight = data()
    logits = hidden @ weight.T

    def on_logits(labels, **kw):
        return fastdpo.sequence_logps(logits, labels, backend=backend, **kw)

    def on_hidden(labels, **kw):
        return fastdpo.linear_sequence_logps(hidden, weight, labels, backend=backend, **kw)

    return logits, [on_logits, on_hidden]


# ---------------------------------------------------------------- average with weights < 0


def test_average_divides_by_a_negative_weight_sum(backend):
    logits, fns = seq_fns(backend)
    _, labels, _, _ = data()
    w = -torch.rand(labels.shape) - 0.5  # every weight negative: the sum is < 0
    tok = R.token_logps(logits, labels)
    expect = (tok * w).sum(-1) / w.sum(-1)
    for fn in fns:
        out = fn(labels, token_weights=w, average=True)
        torch.testing.assert_close(out.double(), expect.to(torch.float64), rtol=1e-5, atol=1e-5)


def test_average_mixed_signs_and_empty(backend):
    logits, fns = seq_fns(backend)
    _, labels, _, _ = data()
    labels = labels.clone()
    labels[1] = -100  # second sequence scores nothing: average 0
    w = torch.ones(labels.shape)
    w[0, :3] = -2.0  # weights -2, -2, -2, 1, 1, 1: sum -3
    tok = R.token_logps(logits, labels)
    for fn in fns:
        out = fn(labels, token_weights=w, average=True)
        assert out[1].item() == 0.0
        torch.testing.assert_close(out[0].double(), (tok[0] * w[0]).sum() / -3.0,
                                   rtol=1e-5, atol=1e-5)


def test_average_of_cancelling_weights_is_not_finite(backend):
    """Weights summing to 0 have no mean: the result must not be a plausible number."""
    _, fns = seq_fns(backend)
    _, labels, _, _ = data()
    w = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0]).expand(2, 6)
    for fn in fns:
        assert not torch.isfinite(fn(labels, token_weights=w, average=True)).any()
        # zero weights are no weights: 0
        assert torch.equal(fn(labels, token_weights=torch.zeros(2, 6), average=True),
                           torch.zeros(2))


def test_average_negative_weights_packed(backend):
    logits, labels, _, _ = data(B=1, T=9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    w = -torch.rand(1, 9) - 0.1
    out = fastdpo.sequence_logps(logits[0], labels[0], token_weights=w[0], average=True,
                                 cu_seqlens=cu, backend=backend)
    expect = R.sequence_logps(logits[0], labels[0], token_weights=w[0], cu_seqlens=cu)
    expect = expect / torch.stack([w[0, :4].sum(), w[0, 4:].sum()]).double()
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- non-finite weights, ignored


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("average", [False, True])
def test_ignored_tokens_ignore_their_weight(backend, poison, average):
    _, fns = seq_fns(backend)
    _, labels, _, _ = data()
    labels = labels.clone()
    labels[:, 2] = -100
    w = torch.rand(labels.shape) + 0.5
    for fn in fns:
        for shift in (False, True):
            clean = fn(labels, token_weights=w, average=average, shift=shift)
            bad = w.clone()
            bad[:, 2] = poison
            if shift:  # position 0 is never scored with shift: its weight is ignored too
                bad[:, 0] = poison
            out = fn(labels, token_weights=bad, average=average, shift=shift)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, clean, rtol=0, atol=0)


def test_ignored_weight_does_not_poison_gradient(backend):
    logits, labels, _, _ = data()
    labels = labels.clone()
    labels[:, -1] = -100
    w = torch.ones(labels.shape)
    w[:, -1] = float("nan")
    x = logits.clone().requires_grad_(True)
    fastdpo.sequence_logps(x, labels, token_weights=w, backend=backend).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))


def test_packed_sequence_start_ignores_its_weight(backend):
    """With shift and cu_seqlens the first label of each sequence is not scored."""
    logits, labels, _, _ = data(B=1, T=9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    w = torch.ones(9)
    clean = fastdpo.sequence_logps(logits[0], labels[0], token_weights=w, shift=True,
                                   cu_seqlens=cu, backend=backend)
    w[4] = float("nan")
    out = fastdpo.sequence_logps(logits[0], labels[0], token_weights=w, shift=True,
                                 cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


# ---------------------------------------------------------------- integer flags


@pytest.mark.parametrize("value", [2, 1, 0, 1.0, "yes", None, torch.tensor(True)])
def test_shift_must_be_a_bool(backend, value):
    logits, labels, hidden, weight = data()
    calls = [lambda: fastdpo.token_logps(logits, labels, shift=value, backend=backend),
             lambda: fastdpo.sequence_logps(logits, labels, shift=value, backend=backend),
             lambda: fastdpo.linear_token_logps(hidden, weight, labels, shift=value,
                                                backend=backend),
             lambda: fastdpo.linear_sequence_logps(hidden, weight, labels, shift=value,
                                                   backend=backend)]
    for call in calls:
        with pytest.raises(TypeError, match="shift must be True or False"):
            call()


def test_numpy_bool_is_a_bool(backend):
    np = pytest.importorskip("numpy")
    logits, labels, _, _ = data()
    out = fastdpo.token_logps(logits, labels, shift=np.bool_(True), backend=backend)
    assert torch.equal(out, fastdpo.token_logps(logits, labels, shift=True, backend=backend))


# ---------------------------------------------------------------- validate under torch.compile


def _bad_labels():
    logits, labels, hidden, weight = data()
    labels = labels.clone()
    labels[1, 3] = logits.shape[-1] + 4
    return logits, labels, hidden, weight


def _compiled(fn, compiler):
    torch._dynamo.reset()
    return torch.compile(fn, backend=compiler, fullgraph=True)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_validate_true_checks_under_compile(compiler):
    logits, labels, _, _ = _bad_labels()
    f = _compiled(lambda x, y: fastdpo.sequence_logps(x, y, backend="torch", validate=True),
                  compiler)
    good = labels.clamp(max=logits.shape[-1] - 1)
    torch.testing.assert_close(f(logits, good),
                               fastdpo.sequence_logps(logits, good, backend="torch"))
    with pytest.raises((ValueError, RuntimeError), match="labels must lie in"):
        f(logits, labels)


def test_validate_true_checks_fused_head_under_compile():
    _, labels, hidden, weight = _bad_labels()
    f = _compiled(lambda h, w, y: fastdpo.linear_token_logps(h, w, y, backend="torch",
                                                             validate=True), "aot_eager")
    with pytest.raises((ValueError, RuntimeError), match="labels must lie in"):
        f(hidden, weight, labels)


def test_validate_true_checks_cu_seqlens_under_compile():
    logits, labels, _, _ = data(B=1, T=9)
    f = _compiled(lambda x, y, cu: fastdpo.sequence_logps(x, y, cu_seqlens=cu, backend="torch",
                                                          validate=True), "aot_eager")
    with pytest.raises((ValueError, RuntimeError), match="non-decreasing"):
        f(logits[0], labels[0], torch.tensor([0, 5, 3, 9], dtype=torch.int32))


def test_compile_default_stays_unchecked():
    """Without validate=True a compiled call adds no check: a bad label gives NaN (documented)."""
    logits, labels, _, _ = _bad_labels()
    f = _compiled(lambda x, y: fastdpo.token_logps(x, y, backend="torch"), "aot_eager")
    out = f(logits, labels)
    assert torch.isnan(out[1, 3]) and torch.isfinite(out[0]).all()


def test_fastdpo_check_turns_checks_on_under_compile(monkeypatch):
    monkeypatch.setenv("FASTDPO_CHECK", "1")
    logits, labels, _, _ = _bad_labels()
    f = _compiled(lambda x, y: fastdpo.token_logps(x, y, backend="torch"), "aot_eager")
    with pytest.raises((ValueError, RuntimeError), match="labels must lie in"):
        f(logits, labels)


# ---------------------------------------------------------------- the oracle at large offsets


@pytest.mark.parametrize("offset", [1e8, -1e8, 1e12])
@pytest.mark.parametrize("temperature", [0.7, 3.0])
def test_oracle_is_exact_at_large_fp64_offsets(offset, temperature):
    """The fp64 oracle divided by the temperature before subtracting the row max, so at logits
    near 1e8 its own rounding (~1e-8) exceeded the rule's fp64 atol and a correct kernel failed
    against it (property-test case: torch backend, V=5, masked, 1e8, T=0.7)."""
    import mpmath

    mpmath.mp.dps = 50
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) + offset
    x[1, 2] = -math.inf
    labels = torch.tensor([0, 3, 4])
    lp, ent = R.token_logps(x, labels, temperature=temperature, return_entropy=True)
    for r in range(3):
        z = [mpmath.mpf(float(v)) / mpmath.mpf(temperature) for v in x[r].tolist()
             if v != -math.inf]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v - max(z)) for v in z)) + max(z)
        want = mpmath.mpf(float(x[r, labels[r]])) / mpmath.mpf(temperature) - lse
        want_ent = -mpmath.fsum(mpmath.exp(v - lse) * (v - lse) for v in z)
        assert abs(float(want) - lp[r].item()) <= 1e-12, (r, float(want), lp[r].item())
        assert abs(float(want_ent) - ent[r].item()) <= 1e-12, (r, float(want_ent), ent[r].item())


def test_extreme_fp64_case_holds_the_rule():
    """The property-test example that failed against the inexact oracle, replayed."""
    from test_properties import check_extreme_case

    check_extreme_case("torch", dict(dtype=torch.float64, V=5, pattern="masked",
                                     magnitude=1e8, sign=1.0, temperature=0.7, seed=329))


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("grad", ["none", "weight", "hidden"])
def test_unchecked_invalid_label_is_nan_across_vocabulary_tiles(backend, grad):
    """An out-of-range label, unchecked (validate=False, CUDA's default), is NaN by the row
    contract. The fused head's tile loop started each row's log-prob at 0, which the first
    merge over vocabulary tiles turned into -lse: a plausible finite number."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 64, 64, 20000  # V over one tile of the torch loop's plan
    hidden = torch.randn(1, N, H, generator=g).requires_grad_(grad == "hidden")
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(grad == "weight")
    labels = torch.randint(0, V, (1, N), generator=g)
    labels[0, 5] = V + 3
    lp = fastdpo.linear_token_logps(hidden, weight, labels, backend=backend, validate=False)
    assert math.isnan(lp[0, 5].item())
    assert torch.isfinite(lp[0, torch.arange(N) != 5]).all()
    seq = fastdpo.linear_sequence_logps(hidden, weight, labels, backend=backend,
                                        validate=False)
    assert math.isnan(seq[0].item())


def _pair_batch(seed=3, bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, T, H, V = 3, 9, 16, 53
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[0, 6:] = -100
    rc, rr = torch.randn(B, generator=g) - 20, torch.randn(B, generator=g) - 20
    return hidden, weight, b, labels, rc, rr


def _fused_losses(h, w, labels, rc, rr, **kw):
    yield "dpo", fastdpo.linear_dpo_loss(h, w, labels, ref_chosen_logps=rc,
                                         ref_rejected_logps=rr, **kw)[0]
    yield "cpo", fastdpo.linear_cpo_loss(h, w, labels, **kw)[0]
    yield "orpo", fastdpo.linear_orpo_loss(h, w, labels, **kw)[0]


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fused_losses_refuse_create_graph(backend):
    """A gradient penalty needs the second-order term; the fused losses' backward is a closed
    form with no graph, and under once_differentiable the refusal never fired: the penalty's
    gradient came back as 0."""
    h, w, _, labels, rc, rr = _pair_batch()
    hh = h.clone().requires_grad_()
    for name, loss in _fused_losses(hh, w, labels, rc, rr, backend=backend):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, hh, create_graph=True)


def test_dpo_loss_refuses_create_graph():
    pc = torch.tensor([-10.0, -12.0], requires_grad=True)
    pr = torch.tensor([-11.0, -9.0])
    loss, _ = fastdpo.dpo_loss(pc, pr, pr, pr)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, pc, create_graph=True)
    (g,) = torch.autograd.grad(fastdpo.dpo_loss(pc, pr, pr, pr)[0], pc)  # first order works
    assert torch.isfinite(g).all() and (g != 0).all()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fused_losses_check_the_bias_device(backend):
    """A bias on another device than hidden/weight was not checked: native read garbage, the
    torch backend dropped the bias (the no-bias loss)."""
    h, w, b, labels, rc, rr = _pair_batch(bias=True)
    meta = b.to("meta")
    for fn, kw in ((fastdpo.linear_dpo_loss, dict(ref_chosen_logps=rc, ref_rejected_logps=rr)),
                   (fastdpo.linear_cpo_loss, {}), (fastdpo.linear_orpo_loss, {})):
        with pytest.raises(ValueError, match="bias is on meta"):
            fn(h, w, labels, bias=meta, backend=backend, **kw)
    with pytest.raises(ValueError, match="ref_bias is on meta"):
        fastdpo.linear_dpo_loss(h, w, labels, ref_hidden=h, ref_weight=w, ref_bias=meta,
                                backend=backend)


def test_linear_dpo_loss_refuses_ref_bias_beside_ref_logps():
    h, w, b, labels, rc, rr = _pair_batch(bias=True)
    with pytest.raises(ValueError, match="ref_bias"):
        fastdpo.linear_dpo_loss(h, w, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                ref_bias=b)


@pytest.mark.parametrize("bad", ["False", 1, 0.5])
def test_fused_losses_check_average_is_a_bool(bad):
    h, w, _, labels, rc, rr = _pair_batch()
    for fn, kw in ((fastdpo.linear_dpo_loss, dict(ref_chosen_logps=rc, ref_rejected_logps=rr)),
                   (fastdpo.linear_cpo_loss, {}), (fastdpo.linear_pair_logps, {})):
        with pytest.raises(TypeError, match="average"):
            fn(h, w, labels, average=bad, **kw)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_fp16_loss_scaling_keeps_fused_gradients_finite(backend):
    """GradScaler starts at 2**16, over fp16's max: the stored fp16 gradients were multiplied by
    grad.to(fp16) = inf (NaN on ignored rows). The scaled gradient must equal the unit one times
    the scale, computed in fp32 and rounded once."""
    h, w, _, labels, rc, rr = _pair_batch(seed=1, dtype=torch.float16)
    S = 65536.0
    for name in ("dpo", "cpo"):
        got = []
        for scale in (1.0, S):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = dict(_fused_losses(hh, ww, labels, rc, rr, backend=backend))[name]
            got.append(torch.autograd.grad(loss * scale, (hh, ww)))
        for unit, scaled in zip(*got):
            assert torch.isfinite(scaled).all(), name
            torch.testing.assert_close(scaled, (unit.float() * S).half(), rtol=2e-3, atol=0)


def test_fused_losses_refuse_a_reference_that_needs_a_gradient():
    """dpo_loss / kto_loss differentiate a reference log-prob; the fused losses treated it as
    fixed and silently dropped its gradient."""
    h, w, _, labels, rc, rr = _pair_batch()
    rcg = rc.clone().requires_grad_()
    with pytest.raises(ValueError, match="ref_chosen_logps requires grad"):
        fastdpo.linear_dpo_loss(h, w, labels, ref_chosen_logps=rcg, ref_rejected_logps=rr)
    ref = torch.cat([rc, rr]).requires_grad_()
    desirable = torch.tensor([True, False] * 3)
    with pytest.raises(ValueError, match="ref_logps requires grad"):
        fastdpo.linear_kto_loss(h, w, labels, desirable, ref_logps=ref, kl=0.1)
    with torch.no_grad():  # no gradient asked for: nothing is dropped
        fastdpo.linear_dpo_loss(h, w, labels, ref_chosen_logps=rcg, ref_rejected_logps=rr)
    fastdpo.linear_dpo_loss(h, w, labels, ref_chosen_logps=rcg.detach(), ref_rejected_logps=rr)


def test_family_errors_name_the_argument_at_fault():
    """ORPO's nll_labels and KTO's KL batch were reported as 'labels' / 'hidden' / 'weight'."""
    h, w, _, labels, rc, rr = _pair_batch()
    V, H = w.shape
    nll = labels.clone()
    nll[nll == -100] = V + 5
    with pytest.raises(ValueError, match="^nll_labels must lie"):
        fastdpo.linear_orpo_loss(h, w, labels, nll_labels=nll)
    desirable = torch.tensor([True, False] * 3)
    ref = torch.cat([rc, rr])
    g = torch.Generator().manual_seed(0)
    klh, kll = torch.randn(6, 9, H, generator=g), torch.randint(0, V, (6, 9), generator=g)
    kw = dict(ref_logps=ref, ref_kl_logps=ref)
    cases = [(dict(kl_hidden=klh[..., :-1], kl_labels=kll), ValueError, "kl_hidden"),
             (dict(kl_hidden=klh, kl_labels=kll[:, :-1]), ValueError, "^kl_labels must have"),
             (dict(kl_hidden=klh, kl_labels=kll + V), ValueError, "^kl_labels must lie"),
             (dict(kl_hidden=klh.long(), kl_labels=kll), TypeError, "^kl_hidden must be")]
    for extra, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastdpo.linear_kto_loss(h, w, labels, desirable, **kw, **extra)
