"""linear_cpo_loss / linear_orpo_loss / linear_kto_loss: CPO-SimPO-AlphaPO, ORPO and KTO through
the fused LM head with the gradients formed in forward.

Value, metrics and gradients (hidden, weight, bias) against the public loss of float64 sequence
log-probs (fastdpo.reference: the oracle) under the tolerance rule, fp32 eager as the low-precision
baseline, on every backend; equal to the composition with linear_sequence_logps; the matmul
count of each path (3 trainable, 2 frozen); the modules' routing; the errors.
"""

import pytest
import torch

import fastdpo
from fastdpo import reference as R
from fastdpo.losses import cpo_loss, kto_loss, orpo_loss
from fastdpo.losses.fused_linear_family import linear_cpo_loss, linear_kto_loss, linear_orpo_loss
from matmul_count import MatmulFlops
from tolerance import assert_rule

def batch(B=3, T=9, H=16, V=53, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100                      # prompt
    labels[0, 6:] = -100                      # padding
    labels[torch.rand(2 * B, T, generator=g) < 0.1] = -100
    # ORPO's NLL over prompt + completion: the input ids (padding ignored)
    nll_labels = torch.where(labels != -100, labels, torch.randint(0, V, labels.shape,
                                                                   generator=g))
    nll_labels[0, 6:] = -100
    kto = {"desirable": torch.rand(2 * B, generator=g) < 0.5,
           "ref_logps": torch.randn(2 * B, generator=g) - 25.0,
           "kl_hidden": torch.randn(2 * B, T, H, generator=g).to(dtype),
           "kl_labels": labels.roll(1, 0)}
    kto["desirable"][:2] = torch.tensor([True, False])
    return hidden, weight, b, labels, nll_labels, kto


def seq_logps(h, w, b, labels, dtype, opts):
    z = R.head_logits(h, w, b, logit_scale=opts.get("logit_scale", 1.0),
                      softcap=opts.get("softcap"))
    return R.sequence_logps(z, labels, shift=True, temperature=opts.get("temperature", 1.0),
                            token_weights=opts.get("token_weights"), dtype=dtype)


def counts(labels):
    return (labels[:, 1:] != -100).sum(1)


def composed(family, h, w, b, data, dtype, opts, kw):
    """The public loss of sequence log-probs computed in ``dtype`` (float64: the oracle)."""
    labels, nll_labels, kto = data[3], data[4], data[5]
    sl = seq_logps(h, w, b, labels, dtype, opts)
    n = counts(labels).to(dtype)
    B = labels.shape[0] // 2
    if family == "cpo":
        return cpo_loss(sl[:B], sl[B:], chosen_lengths=n[:B], rejected_lengths=n[B:], **kw)
    if family == "orpo":
        extra = {}
        if kw.get("nll_labels") is not None:
            ns = seq_logps(h, w, b, nll_labels, dtype, opts)
            extra = dict(nll_logps=ns[:B], nll_lengths=counts(nll_labels)[:B])
        kw = {k: v for k, v in kw.items() if k != "nll_labels"}
        return orpo_loss(sl[:B], sl[B:], chosen_lengths=n[:B], rejected_lengths=n[B:], **kw,
                         **extra)
    kw = dict(kw)
    if kw.pop("kl_from_hidden", False):
        with torch.no_grad():
            pk = seq_logps(data[5]["kl_hidden"].to(dtype), w.detach(),
                           None if b is None else b.detach(), kto["kl_labels"], dtype,
                           {k: v for k, v in opts.items() if k != "token_weights"})
        kw.update(policy_kl_logps=pk, ref_kl_logps=kto["ref_kl_logps"].to(dtype))
    return kto_loss(sl, kto["ref_logps"].to(dtype), kto["desirable"], **kw)


def fused(family, h, w, b, data, opts, kw, backend, chunk_rows):
    labels, nll_labels, kto = data[3], data[4], data[5]
    common = dict(bias=b, backend=backend, chunk_rows=chunk_rows, **opts)
    if family == "cpo":
        return linear_cpo_loss(h, w, labels, **common, **kw)
    if family == "orpo":
        kw = dict(kw, nll_labels=nll_labels) if kw.get("nll_labels") is not None else kw
        return linear_orpo_loss(h, w, labels, **common, **kw)
    kw = dict(kw)
    if kw.pop("kl_from_hidden", False):
        kw.update(kl_hidden=kto["kl_hidden"], kl_labels=kto["kl_labels"],
                  ref_kl_logps=kto["ref_kl_logps"])
    return linear_kto_loss(h, w, labels, kto["desirable"], ref_logps=kto["ref_logps"], **common,
                           **kw)


def with_kl(data):
    """A KL batch whose baseline is positive (not clamped to 0)."""
    h, w, b, labels, nll, kto = data
    with torch.no_grad():
        pk = seq_logps(kto["kl_hidden"].double(), w.double(), None if b is None else b.double(),
                       kto["kl_labels"], torch.float64, {})
    kto = dict(kto, ref_kl_logps=(pk - 1.5 + 0.3 * torch.arange(pk.numel())).float())
    return h, w, b, labels, nll, kto


def check(family, data, kw, *, backend="torch", opts=None, chunk_rows=5, frozen=False):
    opts = opts or {}
    # frozen: True freezes the head (weight, bias), "hidden" the hidden states
    leaves = lambda dt: [None if t is None else t.detach().to(dt).requires_grad_(  # noqa: E731
        not (frozen is True and i > 0) and not (frozen == "hidden" and i == 0))
        for i, t in enumerate(data[:3])]
    h, w, b = leaves(data[0].dtype)
    loss, metrics = fused(family, h, w, b, data, opts, kw, backend, chunk_rows)
    wrt = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    refs = []
    for dt in (torch.float64, torch.float32):
        h2, w2, b2 = leaves(dt)
        o = {k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in opts.items()}
        l2, m2 = composed(family, h2, w2, b2, data, dt, o, kw)
        refs.append((l2, torch.autograd.grad(l2, [t for t in (h2, w2, b2)
                                                  if t is not None and t.requires_grad]), m2))
    (l64, g64, m64), (l32, g32, _) = refs
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rule(loss, l64, l32, torch.float32, what=f"{family} loss")
    for i, (g, a, e) in enumerate(zip(grads, g64, g32)):
        assert g.dtype == wrt[i].dtype
        assert_rule(g, a, e, torch.float32, what=f"{family} grad {i}")
    assert metrics.keys() == m64.keys()
    for k in m64:
        assert_rule(metrics[k], m64[k], m64[k].float(), torch.float32, what=k)
    return loss, metrics


CPO_CASES = [dict(loss_type="sigmoid", label_smoothing=0.1),
             dict(loss_type="hinge", beta=0.5),
             dict(loss_type="ipo", cpo_alpha=0.5),
             dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.8, beta=2.0),
             dict(loss_type="simpo", alpha=0.3, beta=2.0, reduction="sum"),  # AlphaPO
             dict(loss_type="sigmoid", alpha=-0.2)]
ORPO_CASES = [dict(beta=0.3), dict(nll_labels=True, beta=0.2), dict(nll_weight=0.0),
              dict(nll_labels=True, reduction="sum")]
KTO_CASES = [dict(kl=0.4, beta=0.3, desirable_weight=1.3),
             dict(kl_from_hidden=True, undesirable_weight=0.7, reduction="sum"),
             dict(loss_type="apo_zero_unpaired", beta=0.5)]


@pytest.mark.parametrize("kw", CPO_CASES)
def test_cpo_every_loss_type(kw):
    check("cpo", batch(seed=1), kw)


@pytest.mark.parametrize("kw", ORPO_CASES)
def test_orpo(kw):
    _, metrics = check("orpo", batch(seed=2), kw)
    assert metrics["nll_loss"] != 0 or kw.get("nll_weight") == 0.0


@pytest.mark.parametrize("kw", KTO_CASES)
def test_kto(kw):
    _, metrics = check("kto", with_kl(batch(seed=3)), kw)
    if kw.get("kl_from_hidden"):
        assert metrics["kl"] > 0.5  # the baseline really enters


FAMILIES = [("cpo", dict(loss_type="simpo", cpo_alpha=0.5)), ("cpo", dict(loss_type="ipo")),
            ("orpo", dict(nll_labels=True)), ("kto", dict(kl_from_hidden=True))]


@pytest.mark.parametrize("family,kw", FAMILIES, ids=["simpo", "cpo_ipo", "orpo", "kto"])
def test_every_backend(backend, family, kw):
    data = with_kl(batch(B=2, T=6, H=8, V=37, seed=4, bias=True))
    check(family, data, kw, backend=backend, chunk_rows=4)


@pytest.mark.parametrize("family,kw", FAMILIES, ids=["simpo", "cpo_ipo", "orpo", "kto"])
def test_head_options_token_weights_and_bias(family, kw):
    data = with_kl(batch(seed=5, bias=True))
    g = torch.Generator().manual_seed(1)
    tw = torch.rand(data[3].shape, generator=g) + 0.2
    opts = dict(softcap=2.5, temperature=0.7, logit_scale=1.3, token_weights=tw)
    check(family, data, kw, opts=opts, chunk_rows=7)


@pytest.mark.parametrize("backend_name", ["torch", "native"])
@pytest.mark.parametrize("family,kw", FAMILIES, ids=["simpo", "cpo_ipo", "orpo", "kto"])
def test_frozen_head(family, kw, backend_name, monkeypatch):
    """weight and bias need no gradient (LoRA): only d hidden, 2 matmuls (on native, the frozen-
    head op: ORPO's NLL rows and KTO's KL pass included, no Python chunk loop)."""
    if backend_name == "native":
        from fastdpo.autograd import linear_loss as AL

        def no_loop(*a, **k):
            raise AssertionError("the Python chunk loop ran")

        monkeypatch.setattr(AL, "logits_tile", no_loop)
    check(family, with_kl(batch(seed=6, bias=True)), kw, frozen=True, backend=backend_name)


@pytest.mark.parametrize("family,kw", FAMILIES, ids=["simpo", "cpo_ipo", "orpo", "kto"])
def test_equals_composition_with_linear_sequence_logps(family, kw):
    h, w, b, labels, nll, kto = with_kl(batch(seed=7))
    outs = []
    for how in ("fused", "composed"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if how == "fused":
            loss, m = fused(family, hh, ww, None, (h, w, b, labels, nll, kto), {}, kw, "torch",
                            None)
        else:
            def sl(lab, hid=hh, wt=ww):
                return fastdpo.linear_sequence_logps(hid, wt, lab, shift=True, backend="torch")
            B = labels.shape[0] // 2
            n = counts(labels).float()
            if family == "cpo":
                loss, m = cpo_loss(*sl(labels).chunk(2), chosen_lengths=n[:B],
                                   rejected_lengths=n[B:], **kw)
            elif family == "orpo":
                loss, m = orpo_loss(*sl(labels).chunk(2), chosen_lengths=n[:B],
                                    rejected_lengths=n[B:], nll_logps=sl(nll)[:B],
                                    nll_lengths=counts(nll)[:B])
            else:
                with torch.no_grad():
                    pk = sl(kto["kl_labels"], kto["kl_hidden"], w)
                loss, m = kto_loss(sl(labels), kto["ref_logps"], kto["desirable"],
                                   policy_kl_logps=pk, ref_kl_logps=kto["ref_kl_logps"])
        outs.append((loss, *torch.autograd.grad(loss, (hh, ww)), *m.values()))
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


def test_non_finite_row_scored_by_the_nll_only_stays_out_of_the_pair_logps():
    """A prompt token only ORPO's NLL scores (weight 0 in the pair's sum) with a NaN log-prob:
    the NLL and the loss are NaN, but the pair log-probs, their metrics and the other rows'
    gradients stay those of the composition (an ignored token contributes exactly 0)."""
    h, w, _, labels, nll, _ = batch(seed=12)
    h = h.clone()
    h[0, 1] = float("nan")  # position 1 scores labels[0, 2]: prompt, in nll_labels only
    assert labels[0, 2] == -100 and nll[0, 2] != -100
    B = labels.shape[0] // 2
    outs = []
    for how in ("fused", "composed"):
        hh = h.clone().requires_grad_()
        if how == "fused":
            loss, m = linear_orpo_loss(hh, w, labels, nll_labels=nll, backend="torch")
        else:
            def sl(lab):
                return fastdpo.linear_sequence_logps(hh, w, lab, shift=True, backend="torch")
            n = counts(labels).float()
            loss, m = orpo_loss(*sl(labels).chunk(2), chosen_lengths=n[:B],
                                rejected_lengths=n[B:], nll_logps=sl(nll)[:B],
                                nll_lengths=counts(nll)[:B])
        (g,) = torch.autograd.grad(loss, hh)
        outs.append((loss, g, m))
    (loss, g, m), (loss2, g2, m2) = outs
    assert loss.isnan() and loss2.isnan() and m["nll_loss"].isnan()
    for k in ("logps/chosen", "logps/rejected", "rewards/margins", "log_odds_ratio"):
        assert m[k].isfinite(), k
        torch.testing.assert_close(m[k], m2[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert g[1:].isfinite().all()


@pytest.mark.parametrize("family,kw", FAMILIES, ids=["simpo", "cpo_ipo", "orpo", "kto"])
def test_frozen_hidden_states(family, kw):
    """Only the head trains (hidden states without a gradient): d weight and d bias alone."""
    check(family, with_kl(batch(seed=13, bias=True)), kw, frozen="hidden")


def test_kto_baseline_is_clamped_at_zero():
    """A KL batch whose mean log-ratio is negative: the baseline is 0 (TRL clamps it), whether
    the KL batch comes as log-probs or as hidden states; value and gradients as the oracle."""
    h, w, b, labels, nll, kto = with_kl(batch(seed=14))
    kto = dict(kto, ref_kl_logps=kto["ref_kl_logps"] + 3.0)  # the mean log-ratio becomes < 0
    for kw in (dict(kl_from_hidden=True), dict(kl_from_hidden=True, reduction="sum")):
        _, metrics = check("kto", (h, w, b, labels, nll, kto), kw)
        assert metrics["kl"] == 0


def test_reference_pass_reuses_the_row_plan(monkeypatch):
    """The row plan (nonzero + the counts per sequence: a host sync) is made once per call; the
    reference given as hidden states walks the same rows."""
    import fastdpo.losses.fused_batch as fl
    calls = []
    real = fl.build_rows
    monkeypatch.setattr(fl, "build_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, _, labels, _, kto = batch(seed=15)
    B = labels.shape[0] // 2
    for run in (lambda: linear_kto_loss(h, w, labels, kto["desirable"], ref_hidden=h * 0.5,
                                        ref_weight=w, kl=0.1, backend="torch"),
                lambda: fastdpo.linear_dpo_loss(h, w, labels, ref_hidden=h * 0.5, ref_weight=w,
                                                backend="torch")):
        calls.clear()
        loss, m = run()
        assert len(calls) == 1
    hh = (h * 0.5).double()
    ref = seq_logps(hh, w.double(), None, labels, torch.float64, {})
    assert_rule(m["logps/chosen"] - m["rewards/chosen"] / 0.1, ref[:B].mean(),
                ref[:B].float().mean(), torch.float32, what="reference log-probs")


# ------------------------------------------------------------------------- matmul counts


def scored_rows(labels, nll_labels=None):
    """Rows the pass computes: the labelled ones, and the chosen half's NLL tokens."""
    active = labels[:, 1:] != -100
    if nll_labels is not None:
        B = labels.shape[0] // 2
        active[:B] |= nll_labels[:B, 1:] != -100
    return int(active.sum())


def gemm_count(family, kw, trainable_head=True, use_nll_rows=False, chunk_rows=None,
               with_rows=False):
    h, w, _, labels, nll, kto = with_kl(batch(B=4, T=10, H=24, V=97, seed=8))
    n_rows = scored_rows(labels, nll if use_nll_rows else None)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(trainable_head)
    with MatmulFlops() as fm:
        loss, _ = fused(family, hh, ww, None, (h, w, None, labels, nll, kto), {}, dict(kw),
                        "torch", chunk_rows)
        loss.backward()
    count = fm.macs / (n_rows * 24 * 97)
    if not with_rows:
        return count
    return count, max((e.input_shapes[0][0] for e in fm.prof.events()
                       if e.name == "aten::mm" and e.input_shapes[1][1] == 97), default=0)


@pytest.mark.parametrize("family,kw", FAMILIES[:1] + [("orpo", {}), ("kto", dict(kl=0.1))],
                         ids=["cpo", "orpo", "kto"])
def test_gemm_count(family, kw):
    assert gemm_count(family, kw) == 3
    assert gemm_count(family, kw, trainable_head=False) == 2


@pytest.mark.parametrize("family,kw", FAMILIES[:1] + [("orpo", {}), ("kto", dict(kl=0.1))],
                         ids=["cpo", "orpo", "kto"])
def test_chunk_rows_bounds_the_logits_held(family, kw):
    """chunk_rows under a pair's (or example's) row count streams it, as linear_dpo_loss does: a
    first log-prob pass, then slabs of at most chunk_rows rows with the known gradients (one
    matmul more); before, CPO/ORPO/KTO held the whole pair's logits whatever chunk_rows said."""
    count, rows = gemm_count(family, kw, chunk_rows=5, with_rows=True)
    assert count == 4 and 0 < rows <= 5, (count, rows)
    count, rows = gemm_count(family, kw, chunk_rows=40, with_rows=True)
    assert count == 3 and rows > 5


def test_gemm_count_extra_passes():
    # ORPO's NLL over prompt + completion: its prompt rows join the same pass
    assert gemm_count("orpo", dict(nll_labels=True), use_nll_rows=True) == 3
    # KTO: the KL batch through the policy head, without a graph: one matmul over its rows
    h, w, _, labels, _, kto = batch(B=4, T=10, H=24, V=97, seed=8)
    n_pol = int((labels[:, 1:] != -100).sum())
    n_kl = int((kto["kl_labels"][:, 1:] != -100).sum())
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with MatmulFlops() as fm:
        loss, _ = linear_kto_loss(hh, ww, labels, kto["desirable"], ref_hidden=h * 0.5,
                                  ref_weight=w, kl_hidden=kto["kl_hidden"],
                                  kl_labels=kto["kl_labels"], ref_kl_hidden=kto["kl_hidden"],
                                  backend="torch")
        loss.backward()
    assert fm.macs == (3 * n_pol + n_pol + 2 * n_kl) * 24 * 97


# ------------------------------------------------------------------------ modules and more


def test_modules_route_to_the_fused_path():
    h, w, b, labels, nll, kto = with_kl(batch(seed=9, bias=True))
    cases = [
        (fastdpo.CPOLoss(loss_type="simpo", cpo_alpha=0.3, backend="torch"), {},
         lambda hh, ww, bb: linear_cpo_loss(hh, ww, labels, bias=bb, loss_type="simpo",
                                            cpo_alpha=0.3, backend="torch")),
        (fastdpo.ORPOLoss(beta=0.2, backend="torch"), {"nll_labels": nll},
         lambda hh, ww, bb: linear_orpo_loss(hh, ww, labels, bias=bb, beta=0.2, nll_labels=nll,
                                             backend="torch")),
        (fastdpo.KTOLoss(beta=0.2, backend="torch"),
         {"desirable": kto["desirable"], "ref_logps": kto["ref_logps"].chunk(2), "kl": 0.3},
         lambda hh, ww, bb: linear_kto_loss(hh, ww, labels, kto["desirable"], bias=bb, kl=0.3,
                                            ref_logps=kto["ref_logps"], beta=0.2,
                                            backend="torch")),
    ]
    for crit, kw, direct in cases:
        n_rows = scored_rows(labels, kw.get("nll_labels"))
        outs = []
        for how in ("module", "direct"):
            hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
            with MatmulFlops() as fm:
                loss, m = (crit(labels=labels, hidden=hh, weight=ww, bias=bb, **kw)
                           if how == "module" else direct(hh, ww, bb))
                grads = torch.autograd.grad(loss, (hh, ww, bb))
            outs.append((loss, *grads, *m.values()))
        assert fm.macs == 3 * n_rows * h.shape[-1] * w.shape[0]  # 4 on the recomputing path
        for x, y in zip(*outs):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        # and the logits path of the same module agrees
        hh, ww, bb = (t.double().requires_grad_() for t in (h, w, b))
        loss64, _ = crit(hh @ ww.t() + bb, labels, **kw)
        assert_rule(outs[0][0], loss64, loss64.float(), torch.float32, what=type(crit).__name__)


def test_batch_invariant_and_bf16():
    check("cpo", batch(seed=10), dict(loss_type="simpo"), opts=dict(batch_invariant=True))
    h, w, _, labels, _, _ = batch(seed=10)
    kw = dict(loss_type="simpo", cpo_alpha=0.0, backend="torch", reduction="sum", chunk_rows=5)
    hh = h.clone().requires_grad_()
    loss, _ = linear_cpo_loss(hh, w, labels, batch_invariant=True, **kw)
    (g,) = torch.autograd.grad(loss, hh)
    hh2 = h[[0, 3]].clone().requires_grad_()  # pair 0 alone
    loss2, _ = linear_cpo_loss(hh2, w, labels[[0, 3]], batch_invariant=True, **kw)
    (g2,) = torch.autograd.grad(loss2, hh2)
    assert torch.equal(g[[0, 3]], g2)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss_b, _ = linear_orpo_loss(hb, wb, labels, backend="torch")
    gb = torch.autograd.grad(loss_b, (hb, wb))
    assert loss_b.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in gb)
    ref = []
    for dt in (torch.float64, torch.bfloat16):
        h2, w2 = hb.detach().to(dt).requires_grad_(), wb.detach().to(dt).requires_grad_()
        lo, _ = composed("orpo", h2, w2, None, (h, w, None, labels, None, None), dt, {},
                         {})
        ref.append((lo, *torch.autograd.grad(lo, (h2, w2))))
    for ours, r64, rlo in zip((loss_b, *gb), *ref):
        assert_rule(ours, r64, rlo, torch.bfloat16, what="bf16")


def test_backward_scales_and_runs_once():
    h, w, _, labels, _, kto = batch(seed=11)
    hh = h.clone().requires_grad_()
    outs = []
    for scale in (1.0, 3.0):
        loss, _ = linear_kto_loss(hh, w, labels, kto["desirable"], ref_logps=kto["ref_logps"],
                                  kl=0.2, backend="torch")
        outs.append(torch.autograd.grad(scale * loss, hh, retain_graph=True)[0])
    torch.testing.assert_close(3.0 * outs[0], outs[1])
    with pytest.raises(RuntimeError, match="linear_kto_loss: backward ran twice"):
        torch.autograd.grad(loss, hh)


def test_errors_name_the_argument():
    h, w, _, labels, nll, kto = batch()
    d, ref = kto["desirable"], kto["ref_logps"]
    t = dict(backend="torch")
    bad = labels.clone()
    bad[1, 5] = 10_000
    cases = [
        ("reduction", lambda: linear_cpo_loss(h, w, labels, reduction="none", **t)),
        ("reduction", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref, kl=0.0,
                                              reduction="none", **t)),
        ("loss_type", lambda: linear_cpo_loss(h, w, labels, loss_type="dpo", **t)),
        ("label_smoothing", lambda: linear_cpo_loss(h, w, labels, loss_type="hinge",
                                                    label_smoothing=0.1, **t)),
        ("beta", lambda: linear_orpo_loss(h, w, labels, beta=-1.0, **t)),
        ("hidden must be", lambda: linear_orpo_loss(h[:5], w, labels[:5], **t)),
        ("softcap", lambda: linear_cpo_loss(h, w, labels, softcap=-1.0, **t)),
        ("labels must lie", lambda: linear_cpo_loss(h, w, bad, **t)),
        ("nll_labels must be", lambda: linear_orpo_loss(h, w, labels, nll_labels=nll[:, 1:],
                                                        **t)),
        ("nll_labels must equal", lambda: linear_orpo_loss(
            h, w, labels, nll_labels=torch.where(labels != -100, (labels + 1) % 53, nll), **t)),
        ("nll_weight", lambda: linear_orpo_loss(h, w, labels, nll_weight=0.0, nll_labels=nll,
                                                **t)),
        ("desirable must be a bool", lambda: linear_kto_loss(h, w, labels, d.float(),
                                                             ref_logps=ref, kl=0.0, **t)),
        ("desirable must have shape", lambda: linear_kto_loss(h, w, labels, d[:3],
                                                              ref_logps=ref, kl=0.0, **t)),
        ("ref_logps or ref_hidden", lambda: linear_kto_loss(h, w, labels, d, kl=0.0, **t)),
        ("ref_logps must have shape", lambda: linear_kto_loss(h, w, labels, d,
                                                              ref_logps=ref[:2], kl=0.0, **t)),
        ("KL baseline", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref, **t)),
        ("kl_labels", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref,
                                              kl_hidden=kto["kl_hidden"], ref_kl_logps=ref,
                                              **t)),
        ("not several", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref, kl=0.1,
                                                kl_hidden=h, kl_labels=labels, **t)),
        ("ref_kl_hidden", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref,
                                                  kl_hidden=h, kl_labels=labels, **t)),
        ("need kl_hidden", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref,
                                                   kl_labels=labels, kl=0.1, **t)),
        ("ref_hidden needs ref_weight", lambda: linear_kto_loss(h, w, labels, d,
                                                                ref_hidden=h, kl=0.0, **t)),
        ("no KL baseline", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref, kl=0.1,
                                                   loss_type="apo_zero_unpaired", **t)),
        ("batch_invariant", lambda: linear_cpo_loss(h, w, labels, batch_invariant=1, **t)),
        # labels missing, or options that used to be taken silently (truthy shift, chunk_rows
        # clamped to 1 or truncated) or to fail inside a kernel (a float ignore_index)
        ("labels must be a torch.Tensor", lambda: linear_cpo_loss(h, w, None, **t)),
        ("labels must be a torch.Tensor", lambda: linear_orpo_loss(h, w, None, nll_labels=nll,
                                                                   **t)),
        ("labels must be a torch.Tensor", lambda: fastdpo.KTOLoss(**t)(
            hidden=h, weight=w, desirable=d, ref_logps=ref, kl=0.0)),
        ("labels must be a torch.Tensor", lambda: fastdpo.CPOLoss(**t)(hidden=h, weight=w)),
        ("labels must be a torch.Tensor", lambda: fastdpo.linear_dpo_loss(
            h, w, None, ref_chosen_logps=ref[:3], ref_rejected_logps=ref[3:], **t)),
        ("shift", lambda: linear_cpo_loss(h, w, labels, shift="yes", **t)),
        ("ignore_index", lambda: linear_orpo_loss(h, w, labels, ignore_index=1.5, **t)),
        ("chunk_rows", lambda: linear_cpo_loss(h, w, labels, chunk_rows=0, **t)),
        ("chunk_rows", lambda: linear_kto_loss(h, w, labels, d, ref_logps=ref, kl=0.0,
                                               chunk_rows=2.5, **t)),
        ("chunk_rows", lambda: linear_cpo_loss(h, w, labels, chunk_rows=True, **t)),
    ]
    for match, fn in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            fn()
