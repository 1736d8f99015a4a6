"""Every loss type against independent formulas: float64 torch (+ autograd), mpmath at extremes."""

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

import fastdpo.losses as L

B = 7
LS = {"robust": 0.15, "exo_pair": 0.05, "aot": 0.1, "aot_unpaired": 0.25}


# ---------------------------------------------------------------- float64 torch reference
def f_div(z, kind, alpha):
    if kind == "forward_kl":
        return 1 - torch.exp(-z)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(z)
    if kind == "alpha_divergence" and alpha != 1.0:  # alpha = 1 is reverse KL
        return (torch.exp((alpha - 1) * z) - 1) / (alpha - 1)
    return z


def ref_losses(kind, pc, pr, rc, rr, *, beta, eps=0.0, tau=0.05, s=None, m=None, nc=None,
               nr=None, fdiv="reverse_kl", alpha=0.5, delta=0.0):
    """Per-pair losses, written from the papers' definitions."""
    c, r = pc - rc, pr - rr
    sc, sr = f_div(c, fdiv, alpha), f_div(r, fdiv, alpha)
    if kind in ("ipo", "sigmoid_norm") and nc is not None:
        sc, sr = sc / nc.clamp(min=1), sr / nr.clamp(min=1)
    d = sc - sr
    x = beta * d
    nll = lambda z: F.softplus(-z)  # noqa: E731  -log sigmoid(z)
    sig = torch.sigmoid
    if kind in ("sigmoid", "sigmoid_norm"):
        return nll(x)
    if kind == "hinge":
        return torch.clamp(1 - x, min=0)
    if kind == "ipo":
        return (d - 0.5 / beta) ** 2
    if kind == "exo_pair":  # KL between the model's two-way softmax and (1 - eps, eps)
        q = torch.stack([sig(x), sig(-x)])
        p = torch.tensor([1 - eps, eps], dtype=x.dtype)[:, None]
        return (q * (torch.log(q) - torch.log(p))).sum(0)
    if kind == "robust":
        return ((1 - eps) * nll(x) - eps * nll(-x)) / (1 - 2 * eps)
    if kind == "discopop":
        mod = sig(x / tau)
        return nll(x) * (1 - mod) + torch.exp(-x) * mod
    if kind == "soft":
        return s * nll(x) + (1 - s) * nll(-x)
    if kind == "distill":
        return (x - m) ** 2
    if kind == "nca_pair":
        return nll(beta * c) + 0.5 * nll(-beta * c) + 0.5 * nll(-beta * r)
    if kind == "bco_pair":
        return nll(beta * c - delta) + nll(-(beta * r - delta))
    if kind == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return (1 - sig(beta * c)) + sig(beta * r)
    if kind == "apo_down":
        return sig(beta * c) + (1 - sig(beta * (c - r)))
    if kind == "aot":
        dd = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return (1 - eps) * nll(beta * dd) + eps * nll(-beta * dd)
    if kind == "aot_unpaired":
        dd = torch.sort(c).values - torch.sort(r).values
        return (1 - eps) * nll(beta * dd) + eps * nll(-beta * dd)
    if kind == "sft":
        return (-pc.sum() / nc.sum()).expand(pc.shape)
    raise AssertionError(kind)


def inputs(seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(B, generator=g, dtype=torch.float64) * scale - 30
                      for _ in range(4))
    extra = dict(s=torch.rand(B, generator=g, dtype=torch.float64),
                 m=torch.randn(B, generator=g, dtype=torch.float64) * 2,
                 nc=torch.randint(0, 12, (B,), generator=g).double(),
                 nr=torch.randint(1, 12, (B,), generator=g).double())
    return (pc, pr, rc, rr), extra


def leaf(t, dtype=torch.float64):
    return t.detach().to(dtype).clone().requires_grad_(True)


def run_ours(kind, logps, extra, dtype, *, beta, reduction="none", **kw):
    ts = [leaf(t, dtype) for t in logps]
    s = leaf(extra["s"], dtype) if kind == "soft" else None
    m = leaf(extra["m"], dtype) if kind == "distill" else None
    loss, _ = L.dpo_loss(*ts, beta=beta, loss_type=kind, target_probs=s, reward_margins=m,
                         chosen_lengths=extra["nc"].long(), rejected_lengths=extra["nr"].long(),
                         label_smoothing=LS.get(kind, 0.0), reduction=reduction, **kw)
    return loss, ts + [s, m]


def run_ref(kind, logps, extra, *, beta, fdiv="reverse_kl", alpha=0.5, tau=0.05):
    ts = [leaf(t) for t in logps]
    s = leaf(extra["s"]) if kind == "soft" else None
    m = leaf(extra["m"]) if kind == "distill" else None
    loss = ref_losses(kind, *ts, beta=beta, eps=LS.get(kind, 0.0), s=s, m=m, nc=extra["nc"],
                      nr=extra["nr"], fdiv=fdiv, alpha=alpha, tau=tau)
    return loss, ts + [s, m]


def grads_of(loss, leaves, w):
    (loss * w.to(loss.dtype)).sum().backward()
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", L.LOSS_TYPES)
def test_loss_and_grad_vs_reference(kind, dtype):
    logps, extra = inputs(seed=L.LOSS_TYPES.index(kind))
    beta = 0.3
    w = torch.randn(B, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ours, o_leaves = run_ours(kind, logps, extra, dtype, beta=beta)
    ref, r_leaves = run_ref(kind, logps, extra, beta=beta)
    assert ours.dtype == dtype and ours.shape == (B,)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours.double(), ref.detach(), **tol)
    for o, r in zip(grads_of(ours, o_leaves, w), grads_of(ref, r_leaves, w)):
        if r is None and o is not None:  # an input the reference formula does not use
            assert not o.any()
        elif r is not None:
            assert o.dtype == dtype
            torch.testing.assert_close(o.double(), r, **tol)


@pytest.mark.parametrize("kind", L.LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(kind, reduction):
    logps, extra = inputs(seed=3)
    ours, o_leaves = run_ours(kind, logps, extra, torch.float64, beta=0.2, reduction=reduction)
    ref, r_leaves = run_ref(kind, logps, extra, beta=0.2)
    ref = ref.mean() if reduction == "mean" else ref.sum()
    assert ours.dim() == 0
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)
    one = torch.ones(())
    for o, r in zip(grads_of(ours, o_leaves, one), grads_of(ref, r_leaves, one)):
        if r is not None:
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fdiv,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                        ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "exo_pair", "discopop", "soft"])
def test_f_divergences(kind, fdiv, alpha):
    logps, extra = inputs(seed=5, scale=0.5)
    logps = (logps[0], logps[1], logps[0] - 0.3, logps[1] + 0.2)  # log-ratios near 0: exp() tame
    ours, o_leaves = run_ours(kind, logps, extra, torch.float64, beta=0.4, f_divergence_type=fdiv,
                              f_alpha_divergence_coef=alpha)
    ref, r_leaves = run_ref(kind, logps, extra, beta=0.4, fdiv=fdiv, alpha=alpha)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-11, atol=1e-12)
    w = torch.randn(B, dtype=torch.float64)
    for o, r in zip(grads_of(ours, o_leaves, w), grads_of(ref, r_leaves, w)):
        if r is not None:
            torch.testing.assert_close(o, r, rtol=1e-11, atol=1e-12)


def test_combined_loss_types_and_weights():
    logps, extra = inputs(seed=11)
    ts = [leaf(t) for t in logps]
    loss, _ = L.dpo_loss(*ts, beta=0.2, loss_type=["sigmoid", "sppo_hard", "hinge"],
                         loss_weights=[0.5, 0.01, 2.0])
    loss.backward()
    rs = [leaf(t) for t in logps]
    ref = sum(w * ref_losses(k, *rs, beta=0.2).mean()
              for k, w in (("sigmoid", 0.5), ("sppo_hard", 0.01), ("hinge", 2.0)))
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(ts, rs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- soft labels
def test_soft_with_s_one_is_sigmoid_exactly():
    logps, _ = inputs(seed=2, scale=40.0)
    for dtype in (torch.float32, torch.float64):
        a = [leaf(t, dtype) for t in logps]
        b = [leaf(t, dtype) for t in logps]
        la, _ = L.dpo_loss(*a, beta=0.7, loss_type="sigmoid", reduction="none")
        lb, _ = L.dpo_loss(*b, beta=0.7, loss_type="soft", reduction="none",
                           target_probs=torch.ones(B, dtype=dtype))
        assert torch.equal(la, lb)
        la.sum().backward()
        lb.sum().backward()
        for x, y in zip(a, b):
            assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("s", [0.0, 0.5, 1.0])
def test_soft_targets_gradient_is_sigmoid_minus_s(s):
    logps, _ = inputs(seed=4, scale=2.0)
    pc = leaf(logps[0])
    beta = 0.5
    loss, _ = L.dpo_loss(pc, *logps[1:], beta=beta, loss_type="soft", reduction="sum",
                         target_probs=torch.full((B,), s, dtype=torch.float64))
    loss.backward()
    delta = beta * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    # d loss / d delta = sigmoid(delta) - s, times beta for the log-probs
    torch.testing.assert_close(pc.grad, beta * (torch.sigmoid(delta) - s), rtol=1e-12, atol=1e-14)
    # the loss is the cross-entropy of sigmoid(delta) against s
    ce = -(s * torch.log(torch.sigmoid(delta)) + (1 - s) * torch.log(torch.sigmoid(-delta)))
    torch.testing.assert_close(loss, ce.sum(), rtol=1e-12, atol=1e-12)
    if s == 0.5:  # minimised at delta = 0 for an even preference
        z = torch.zeros(B, dtype=torch.float64, requires_grad=True)
        zeros = torch.zeros(B, dtype=torch.float64)
        l0, _ = L.dpo_loss(z, zeros, zeros, zeros, loss_type="soft",
                           target_probs=torch.full((B,), 0.5, dtype=torch.float64))
        l0.backward()
        assert torch.all(z.grad == 0)


# ---------------------------------------------------------------- extremes, against mpmath
mpmath.mp.dps = 60
MP_EPS = {"robust": 0.15, "exo_pair": 0.05}


def mp_loss(kind, pc, pr, rc, rr, beta, s, m, tau):
    """One pair's loss in arbitrary precision (local loss types only)."""
    mp = mpmath
    sig = lambda z: 1 / (1 + mp.exp(-z))  # noqa: E731
    nll = lambda z: mp.log(1 + mp.exp(-z))  # noqa: E731
    c, r = pc - rc, pr - rr
    x = beta * (c - r)
    eps = mp.mpf(MP_EPS.get(kind, 0))
    if kind in ("sigmoid", "sigmoid_norm"):
        return nll(x)
    if kind == "hinge":
        return max(1 - x, 0)
    if kind == "ipo":
        return (c - r - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        return (sig(x) * (mp.log(sig(x)) - mp.log(1 - eps))
                + sig(-x) * (mp.log(sig(-x)) - mp.log(eps)))
    if kind == "robust":
        return ((1 - eps) * nll(x) - eps * nll(-x)) / (1 - 2 * eps)
    if kind == "discopop":
        return nll(x) * (1 - sig(x / tau)) + mp.exp(-x) * sig(x / tau)
    if kind == "soft":
        return s * nll(x) + (1 - s) * nll(-x)
    if kind == "distill":
        return (x - m) ** 2
    if kind == "nca_pair":
        return nll(beta * c) + nll(-beta * c) / 2 + nll(-beta * r) / 2
    if kind == "bco_pair":
        return nll(beta * c) + nll(-beta * r)
    if kind == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if kind == "apo_zero":
        return 1 - sig(beta * c) + sig(beta * r)
    if kind == "apo_down":
        return sig(beta * c) + 1 - sig(x)
    raise AssertionError(kind)


LOCAL = [k for k in L.LOSS_TYPES if k not in ("aot", "aot_unpaired", "sft")]


@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("kind", LOCAL)
def test_extremes_fp32_match_mpmath(kind, beta):
    """Implicit-reward gaps up to 1e4 in fp32: finite, and equal to the exact values."""
    # (pc, pr, rc, rr): chosen/rejected log-ratio gaps of +-1e4, one-sided extremes, and zeros
    rows = [(-1.0, -1e4 - 1, 0.0, 0.0), (-1e4 - 1, -1.0, 0.0, 0.0), (0.0, 0.0, 1e4, -1e4),
            (-5e3, 0.0, 0.0, 5e3), (1e4, 0.0, 0.0, 0.0), (0.0, 1e4, 0.0, 0.0),
            (-3.0, -3.0, -3.0, -3.0), (-20.0, -21.5, -20.25, -21.0)]
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float32) for col in zip(*rows))
    n = len(rows)
    s = torch.tensor([0.0, 1.0, 0.5, 0.9, 0.2, 1.0, 0.3, 0.7])
    m = torch.tensor([1e4, -1e4, 0.0, 3.0, -2.0, 5.0, 0.0, 1.0])
    tau = 0.05
    leaves = [leaf(t, torch.float32) for t in (pc, pr, rc, rr)]
    loss, _ = L.dpo_loss(*leaves, beta=beta, loss_type=kind, reduction="none",
                         label_smoothing=MP_EPS.get(kind, 0.0), discopop_tau=tau,
                         target_probs=s if kind == "soft" else None,
                         reward_margins=m if kind == "distill" else None)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    for i in range(n):
        args = [mpmath.mpf(float(t[i])) for t in (pc, pr, rc, rr)]
        si, mi = mpmath.mpf(float(s[i])), mpmath.mpf(float(m[i]))
        f = lambda *a: mp_loss(kind, *a, beta, si, mi, tau)  # noqa: E731
        exact = f(*args)
        got = float(loss[i].detach())
        assert abs(got - float(exact)) <= 2e-6 * (1 + abs(float(exact))), (i, got, exact)
        if kind == "hinge" and abs(1 - beta * ((args[0] - args[2]) - (args[1] - args[3]))) < 1e-9:
            continue  # at the kink
        for j, t in enumerate(leaves):
            h = [mpmath.mpf(0)] * 4
            h[j] = mpmath.mpf(10) ** -20
            up, dn = [a + b for a, b in zip(args, h)], [a - b for a, b in zip(args, h)]
            dx = (f(*up) - f(*dn)) / (2 * h[j])
            got = float(t.grad[i])
            assert abs(got - float(dx)) <= 2e-6 * (1 + abs(float(dx))), (i, j, got, dx)


@pytest.mark.parametrize("kind", ["aot", "aot_unpaired", "sft"])
def test_extremes_fp32_batch_losses(kind):
    pc = torch.tensor([-1.0, -1e4, 0.0, -3.0])
    pr = torch.tensor([-1e4, -1.0, 0.0, -3.0])
    rc = torch.tensor([0.0, 0.0, 1e4, -3.0])
    rr = torch.tensor([0.0, 0.0, -1e4, -3.0])
    n = torch.tensor([3, 1, 2, 5])
    logps = [t.double() for t in (pc, pr, rc, rr)]
    extra = dict(nc=n.double(), nr=n.double(), s=None, m=None)
    ours, o_leaves = run_ours(kind, [t.float() for t in logps], extra, torch.float32, beta=1.0)
    ref, r_leaves = run_ref(kind, logps, extra, beta=1.0)
    assert torch.isfinite(ours).all()
    w = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    for o, r in zip(grads_of(ours, o_leaves, w), grads_of(ref, r_leaves, w)):
        if r is not None:
            assert torch.isfinite(o).all()
            torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-6)


def test_no_graph_through_formula_and_bf16_inputs():
    logps, extra = inputs(seed=1)
    ts = [leaf(t, torch.bfloat16) for t in logps]
    loss, metrics = L.dpo_loss(*ts, beta=0.1)
    assert loss.dtype == torch.float32
    assert loss.grad_fn.__class__.__name__ == "ClosedFormLossBackward"
    assert not any(f is not None and f.__class__.__name__.startswith("Sub")
                   for f, _ in loss.grad_fn.next_functions)
    loss.backward()
    assert ts[0].grad.dtype == torch.bfloat16
    assert all(not v.requires_grad for v in metrics.values())


def test_metrics_match_definitions():
    logps, _ = inputs(seed=6)
    pc, pr, rc, rr = logps
    beta = 0.25
    _, mt = L.dpo_loss(pc, pr, rc, rr, beta=beta)
    ch, rj = beta * (pc - rc), beta * (pr - rr)
    expect = {"rewards/chosen": ch.mean(), "rewards/rejected": rj.mean(),
              "rewards/margins": (ch - rj).mean(), "rewards/accuracies": (ch > rj).double().mean(),
              "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    assert set(mt) == set(expect)
    for k, v in expect.items():
        torch.testing.assert_close(mt[k], v, rtol=1e-12, atol=1e-12)
    _, per = L.dpo_loss(pc, pr, rc, rr, beta=beta, reduction="none")
    torch.testing.assert_close(per["rewards/margins"], ch - rj, rtol=1e-12, atol=1e-12)


def test_bco_delta_and_running_mean():
    logps, _ = inputs(seed=8)
    pc, pr, rc, rr = logps
    beta, delta = 0.2, 0.37
    loss, _ = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair", bco_delta=delta,
                         reduction="none")
    ref = ref_losses("bco_pair", pc, pr, rc, rr, beta=beta, delta=delta)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    state = L.RewardRunningMean()
    state.update(torch.tensor(1.0))
    state.update(torch.tensor([2.0, 6.0]))
    assert state.value.item() == pytest.approx(3.0) and state.count == 3
    other = L.RewardRunningMean()
    other.load_state_dict(state.state_dict())
    assert other.value.item() == pytest.approx(3.0) and other.count == 3
