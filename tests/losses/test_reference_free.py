"""cpo_loss, orpo_loss, kto_loss: extreme inputs, dtypes, reductions and argument errors.
(Parity with TRL's own code is in test_reference_free_trl_parity.py.)"""

import pytest
import torch

import fastdpo.losses as L

B = 6


def pair(dtype=torch.float32, seed=0, lo=-3.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(B, generator=g, dtype=torch.float64) * lo).to(dtype) for _ in range(2)]


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    loss = fn(*xs)
    loss.sum().backward()
    return loss.detach(), [x.grad for x in xs]


CALLS = {
    **{f"cpo-{t}": (lambda t: lambda a, b: L.cpo_loss(a, b, loss_type=t, cpo_alpha=0.0,
                                                       reduction="none")[0])(t)
       for t in L.CPO_LOSS_TYPES},
    "orpo": lambda a, b: L.orpo_loss(a, b, nll_weight=0.0, reduction="none")[0],
    "kto": lambda a, b: L.kto_loss(a, b, torch.arange(B) % 2 == 0, kl=0.5,
                                   reduction="none")[0],
    "apo_zero_unpaired": lambda a, b: L.kto_loss(a, b, torch.arange(B) % 2 == 0,
                                                 loss_type="apo_zero_unpaired",
                                                 reduction="none")[0],
}


@pytest.mark.parametrize("name", CALLS)
def test_extreme_inputs_stay_finite_and_match_fp64(name):
    """Log-probs from 0 to -1e4 and gaps of 1e4: fp32 loss and gradient finite and equal to the
    fp64 result to fp32 precision."""
    a = torch.tensor([0.0, -1e-30, -1e-7, -1e4, -5.0, -1e4])
    b = torch.tensor([-1e4, -1e4, -1e-6, 0.0 if name != "orpo" else -1e-8, -5.0, -3e3])
    loss32, g32 = grads(CALLS[name], a, b)
    loss64, g64 = grads(CALLS[name], a.double(), b.double())
    assert loss32.dtype == torch.float32 and loss64.dtype == torch.float64
    assert torch.isfinite(loss32).all() and all(torch.isfinite(g).all() for g in g32)
    torch.testing.assert_close(loss32, loss64.float(), rtol=2e-6, atol=1e-6)
    for x, y in zip(g32, g64):
        torch.testing.assert_close(x, y.float(), rtol=2e-5, atol=1e-6)


def test_orpo_certain_chosen_has_finite_gradient():
    """A chosen log-prob of exactly 0 (p = 1, as bf16 kernels round confident tokens): infinite
    odds, loss 0, and the gradient's finite limit -beta * odds(rejected)."""
    a, b = torch.tensor([0.0]), torch.tensor([-0.5])
    loss, (ga, gb) = grads(lambda x, y: L.orpo_loss(x, y, beta=0.3, nll_weight=0.0)[0], a, b)
    odds_r = torch.exp(b) / -torch.expm1(b)
    assert loss.item() == 0.0
    torch.testing.assert_close(ga, -0.3 * odds_r)
    assert gb.item() == 0.0


def test_low_precision_inputs_compute_in_fp32():
    a, b = pair(torch.bfloat16)
    for name, fn in CALLS.items():
        loss, (ga, gb) = grads(fn, a, b)
        assert loss.dtype == torch.float32, name
        assert ga.dtype == torch.bfloat16 and gb.dtype == torch.bfloat16, name
        ref = fn(a.float(), b.float())
        torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", CALLS)
def test_reductions_agree(name):
    a, b = pair(torch.float64, seed=2)
    per = CALLS[name](a, b)
    if name.startswith("cpo"):
        kw = dict(loss_type=name[4:], cpo_alpha=0.0)
        mean = L.cpo_loss(a, b, **kw)[0]
        total = L.cpo_loss(a, b, reduction="sum", **kw)[0]
    elif name == "orpo":
        mean = L.orpo_loss(a, b, nll_weight=0.0)[0]
        total = L.orpo_loss(a, b, nll_weight=0.0, reduction="sum")[0]
    else:
        kw = dict(loss_type=name) if name != "kto" else dict(kl=0.5)
        d = torch.arange(B) % 2 == 0
        mean, total = L.kto_loss(a, b, d, **kw)[0], L.kto_loss(a, b, d, reduction="sum", **kw)[0]
    torch.testing.assert_close(mean, per.mean())
    torch.testing.assert_close(total, per.sum())


def test_nll_term_from_lengths_and_from_explicit_inputs():
    """``cpo_alpha * (-sum(chosen logps) / sum(chosen tokens))`` added to every pair."""
    a, b = pair(torch.float64, seed=4, lo=-30.0)
    n = torch.tensor([3, 5, 1, 7, 2, 4])
    nll = -a.sum() / n.sum()
    base = L.cpo_loss(a, b, cpo_alpha=0.0, reduction="none")[0]
    per, m = L.cpo_loss(a, b, cpo_alpha=0.3, chosen_lengths=n, reduction="none")
    torch.testing.assert_close(per, base + 0.3 * nll)
    torch.testing.assert_close(m["nll_loss"], nll)
    per2, _ = L.cpo_loss(a, b, cpo_alpha=0.3, nll_logps=a, nll_lengths=n, reduction="none")
    torch.testing.assert_close(per2, per)
    # simpo averages the pair's log-probs by the lengths; the NLL still uses the sums
    s, _ = L.cpo_loss(a, b, loss_type="simpo", cpo_alpha=0.3, chosen_lengths=n,
                      rejected_lengths=n, reduction="none")
    s0, _ = L.cpo_loss(a / n, b / n, loss_type="simpo", cpo_alpha=0.0, reduction="none")
    torch.testing.assert_close(s, s0 + 0.3 * nll)


def test_backward_twice_with_retain_graph():
    a, b = pair(torch.float64, seed=6)
    a.requires_grad_(True)
    for loss in (L.cpo_loss(a, b, cpo_alpha=0.0)[0], L.orpo_loss(a, b, nll_weight=0.0)[0],
                 L.dpo_loss(a, b, b, a.detach())[0]):
        g1, = torch.autograd.grad(loss, a, retain_graph=True)
        g2, = torch.autograd.grad(loss, a)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_cpo_errors():
    a, b = pair()
    n = torch.full((B,), 3)
    with pytest.raises(TypeError, match="loss_type"):
        L.cpo_loss(a, b, loss_type=None)
    with pytest.raises(TypeError, match="loss_type"):
        L.cpo_loss(a, b, loss_type=["sigmoid"])  # one loss type only
    with pytest.raises(ValueError, match="unknown loss_type 'kto'.*sigmoid, hinge, ipo, simpo"):
        L.cpo_loss(a, b, loss_type="kto")
    with pytest.raises(ValueError, match="cpo_alpha=1.0 adds the chosen negative"):
        L.cpo_loss(a, b)  # TRL's default cpo_alpha needs the token counts
    with pytest.raises(ValueError, match="label_smoothing has no effect"):
        L.cpo_loss(a, b, loss_type="hinge", label_smoothing=0.1, cpo_alpha=0)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        L.cpo_loss(a, b, label_smoothing=1.5, cpo_alpha=0)
    with pytest.raises(ValueError, match="beta"):
        L.cpo_loss(a, b, beta=0.0, cpo_alpha=0)
    with pytest.raises(TypeError, match="alpha"):
        L.cpo_loss(a, b, alpha=None, cpo_alpha=0)
    with pytest.raises(ValueError, match="both nll_logps and nll_lengths"):
        L.cpo_loss(a, b, nll_logps=a)
    with pytest.raises(ValueError, match="unused with cpo_alpha=0"):
        L.cpo_loss(a, b, cpo_alpha=0, nll_logps=a, nll_lengths=n)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        L.cpo_loss(a, b, loss_type="simpo", chosen_lengths=n, cpo_alpha=0)
    with pytest.raises(ValueError, match="cpo_alpha"):  # simpo without lengths: inputs are means
        L.cpo_loss(a, b, loss_type="simpo")
    with pytest.raises(ValueError, match="policy_rejected_logps must have the shape"):
        L.cpo_loss(a, b[:2], cpo_alpha=0)
    with pytest.raises(ValueError, match="reduction"):
        L.cpo_loss(a, b, cpo_alpha=0, reduction="avg")
    with pytest.raises(TypeError, match="validate"):
        L.cpo_loss(a, b, cpo_alpha=0, validate=1)


def test_orpo_and_kto_errors():
    a, b = pair()
    with pytest.raises(ValueError, match="nll_weight=1.0 adds"):
        L.orpo_loss(a, b)
    with pytest.raises(ValueError, match="<= 0"):
        L.orpo_loss(a.abs() + 0.1, b, nll_weight=0)
    L.orpo_loss(a.abs() + 0.1, b, nll_weight=0, validate=False)  # the check is the value check
    d = torch.arange(B) % 2 == 0
    with pytest.raises(ValueError, match="needs its KL baseline"):
        L.kto_loss(a, b, d)
    with pytest.raises(ValueError, match="uses no KL baseline"):
        L.kto_loss(a, b, d, loss_type="apo_zero_unpaired", kl=0.1)
    with pytest.raises(ValueError, match="not both"):
        L.kto_loss(a, b, d, kl=0.1, policy_kl_logps=a, ref_kl_logps=b)
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        L.kto_loss(a, b, d.long(), kl=0.1)
    with pytest.raises(ValueError, match="desirable must have shape"):
        L.kto_loss(a, b, d[:2], kl=0.1)
    with pytest.raises(TypeError, match="kl must be a real number"):
        L.kto_loss(a, b, d, kl="0.1")
    with pytest.raises(ValueError, match="undesirable_weight"):
        L.kto_loss(a, b, d, kl=0.1, undesirable_weight=float("nan"))
    with pytest.raises(TypeError, match="loss_type"):
        L.kto_loss(a, b, d, loss_type=None, kl=0.1)
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.kto_loss(a, b, d, loss_type="apo_zero", kl=0.1)


def test_orpo_validate_under_compile():
    torch._dynamo.reset()
    a, b = pair()

    @torch.compile(backend="aot_eager")
    def f(x, y):
        return L.orpo_loss(x, y, nll_weight=0.0, validate=True)[0]

    assert torch.isfinite(f(a, b))
    with pytest.raises((RuntimeError, ValueError), match="<= 0"):
        f(a.abs() + 0.1, b)


def test_compile_fullgraph_matches_eager():
    """The closed-form Functions trace into one graph (no break) and give eager's numbers."""
    torch._dynamo.reset()
    a, b = pair(torch.float32, seed=9)
    n = torch.tensor([2, 3, 4, 5, 6, 7])
    d = torch.arange(B) % 2 == 0
    fns = [lambda x, y: L.cpo_loss(x, y, loss_type="simpo", chosen_lengths=n,
                                   rejected_lengths=n, validate=False)[0],
           lambda x, y: L.orpo_loss(x, y, chosen_lengths=n, rejected_lengths=n,
                                    validate=False)[0],
           lambda x, y: L.kto_loss(x, y, d, kl=0.2)[0]]
    for fn in fns:
        eager, ge = grads(fn, a, b)
        comp, gc = grads(torch.compile(fn, backend="aot_eager", fullgraph=True), a, b)
        torch.testing.assert_close(comp, eager)
        torch.testing.assert_close(gc, ge)
