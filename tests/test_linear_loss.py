"""linear_dpo_loss: the fused LM head + pair loss with gradients formed in forward.

Every loss type against dpo_loss of float64 sequence log-probs (the oracle, fastdpo.reference) under
the tolerance rule, with fp32 eager as the low-precision baseline; the matmul count of each path
measured with a dispatch mode (no timing); options, errors and the backward's scaling.
"""

import pytest
import torch

from fastdpo import reference as R
from fastdpo.autograd import linear_loss as AL
from fastdpo.losses.fused_linear import linear_dpo_loss
from fastdpo.losses import LOSS_TYPES, dpo_loss
from matmul_count import MatmulFlops
from tolerance import assert_rule

LS = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.05, "aot_unpaired": 0.05}


def batch(B=3, T=9, H=16, V=53, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100                      # prompt
    labels[0, 6:] = -100                      # padding
    labels[torch.rand(2 * B, T, generator=g) < 0.1] = -100
    rc = torch.randn(B, generator=g) * 3 - 20
    rr = torch.randn(B, generator=g) * 3 - 20
    extra = {"target_probs": torch.rand(B, generator=g),
             "reward_margins": torch.randn(B, generator=g)}
    return hidden, weight, b, labels, rc, rr, extra


def loss_kwargs(kind):
    kinds = [kind] if isinstance(kind, str) else kind
    return {"loss_type": kind, "label_smoothing": max(LS.get(k, 0.0) for k in kinds)}


def oracle(hidden, weight, bias, labels, rc, rr, extra, *, dtype, kind, shift=True,
           temperature=1.0, logit_scale=1.0, softcap=None, token_weights=None, average=False,
           beta=0.1, reduction="mean", chunk_rows=None, batch_invariant=False,
           chosen_lengths=None, rejected_lengths=None, per_pair_metrics=False, **kw):
    """dpo_loss of sequence_logps(logits) in ``dtype`` (float64: the oracle; else eager); the
    completion lengths are the label counts unless given."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_()
              for t in (hidden, weight, bias)]
    h, w, b = leaves
    z = R.head_logits(h, w, b, logit_scale=logit_scale, softcap=softcap)
    sl = R.sequence_logps(z, labels, shift=shift, temperature=temperature,
                          token_weights=token_weights, average=average, dtype=dtype)
    B = labels.shape[0] // 2
    lab = labels[:, 1:] if shift else labels
    n = (lab != -100).sum(1).to(dtype)
    if chosen_lengths is not None:
        n = torch.cat([chosen_lengths, rejected_lengths]).to(dtype)
    s = extra["target_probs"].to(dtype).requires_grad_() if "soft" in kind else None
    m = extra["reward_margins"].to(dtype).requires_grad_() if "distill" in kind else None
    loss, metrics = dpo_loss(sl[:B], sl[B:], rc.to(dtype), rr.to(dtype), beta=beta,
                             target_probs=s, reward_margins=m, chosen_lengths=n[:B],
                             rejected_lengths=n[B:],
                             reduction="none" if per_pair_metrics else reduction,
                             **loss_kwargs(kind), **kw)
    if per_pair_metrics:  # per-pair metrics come with reduction="none"; reduce the loss here
        loss = loss.mean() if reduction == "mean" else loss.sum()
    wrt = [t for t in leaves + [s, m] if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    return loss, grads, metrics


def ours(hidden, weight, bias, labels, rc, rr, extra, *, kind, backend, **kw):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    b = None if bias is None else bias.detach().requires_grad_()
    s = extra["target_probs"].clone().requires_grad_() if "soft" in kind else None
    m = extra["reward_margins"].clone().requires_grad_() if "distill" in kind else None
    loss, metrics = linear_dpo_loss(h, w, labels, bias=b, ref_chosen_logps=rc,
                                    ref_rejected_logps=rr, target_probs=s, reward_margins=m,
                                    backend=backend, **loss_kwargs(kind), **kw)
    wrt = [t for t in (h, w, b, s, m) if t is not None]
    return loss, torch.autograd.grad(loss, wrt), metrics


def check_all(data, *, kind, backend, dtype=torch.float32, **kw):
    loss, grads, metrics = ours(*data, kind=kind, backend=backend, **kw)
    loss64, grads64, metrics64 = oracle(*data, dtype=torch.float64, kind=kind, **kw)
    eager = torch.float32
    loss_lo, grads_lo, _ = oracle(*data, dtype=eager, kind=kind, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rule(loss, loss64, loss_lo, dtype, what=f"{kind} loss")
    for i, (g, g64, glo) in enumerate(zip(grads, grads64, grads_lo)):
        assert g.dtype == data[0].dtype or i >= 3 - (data[2] is None)
        assert_rule(g, g64, glo, dtype, what=f"{kind} grad {i}")
    for k in metrics64:
        assert_rule(metrics[k], metrics64[k], metrics64[k].float(), dtype, what=k)


def assert_oracle(loss, grads, metrics, data, grad_index=None, **kw):
    """``(loss, grads, metrics)`` of one fp32 run against the float64 oracle under the rule;
    ``grad_index``: the oracle's gradient each of ``grads`` is (default: all, in order)."""
    loss64, g64, m64 = oracle(*data, dtype=torch.float64, **kw)
    loss_lo, glo, _ = oracle(*data, dtype=torch.float32, **kw)
    assert_rule(loss, loss64, loss_lo, torch.float32, what="loss")
    for g, i in zip(grads, grad_index or range(len(g64))):
        assert_rule(g, g64[i], glo[i], torch.float32, what=f"grad {i}")
    for k in m64:
        assert_rule(metrics[k], m64[k], m64[k].float(), torch.float32, what=k)


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_every_loss_type_matches_float64(kind):
    check_all(batch(seed=LOSS_TYPES.index(kind)), kind=kind, backend="torch", chunk_rows=5)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "aot", "soft", "distill", "sft"])
def test_every_backend(backend, kind):
    data = batch(B=2, T=6, H=8, V=37, seed=3)
    check_all(data, kind=kind, backend=backend, chunk_rows=4)


@pytest.mark.parametrize("opts", [
    dict(softcap=2.5, temperature=0.7, logit_scale=1.3),
    dict(temperature=3.0, reduction="sum"),
    dict(shift=False, beta=0.5),
    dict(average=True),
    dict(f_divergence_type="js_divergence"),
])
@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_head_options_and_bias(opts, backend_name):
    check_all(batch(bias=True, seed=7), kind="sigmoid", backend=backend_name, chunk_rows=7,
              **opts)


@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_token_weights_and_extreme_offset(backend_name):
    data = list(batch(seed=11))
    data[0] = data[0] * 30 + 0  # sharp softmax
    data[2] = torch.full((data[1].shape[0],), 1e4)  # a large logit offset (bias)
    g = torch.Generator().manual_seed(1)
    tw = torch.rand(data[3].shape, generator=g)
    check_all(tuple(data), kind="sigmoid", backend=backend_name, token_weights=tw, chunk_rows=6)


@pytest.mark.parametrize("backend_name", ["torch", "native"])
@pytest.mark.parametrize("rows", [1, 9, 1000])
def test_multi_loss_with_sft_any_chunking(rows, backend_name):
    check_all(batch(B=4, seed=5), kind=["sigmoid", "bco_pair", "sft"], backend=backend_name,
              loss_weights=[0.8, 0.2, 1.0], chunk_rows=rows)


@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_bf16_inputs_within_rule(backend_name):
    data = batch(dtype=torch.bfloat16, seed=2)
    loss, grads, _ = ours(*data, kind="sigmoid", backend=backend_name, chunk_rows=8)
    loss64, grads64, _ = oracle(*data, dtype=torch.float64, kind="sigmoid")
    loss_lo, grads_lo, _ = oracle(*data, dtype=torch.bfloat16, kind="sigmoid")
    assert_rule(loss, loss64, loss_lo, torch.bfloat16, what="loss")
    for g, g64, glo in zip(grads, grads64, grads_lo):
        assert g.dtype == torch.bfloat16
        assert_rule(g, g64, glo, torch.bfloat16, what="grad")


def test_reference_from_hidden_states():
    h, w, b, labels, _, _, extra = batch(bias=True, seed=4)
    g = torch.Generator().manual_seed(9)
    rh = torch.randn(h.shape, generator=g)
    rw = w + 0.1 * torch.randn(w.shape, generator=g)
    with torch.no_grad():
        rs = R.sequence_logps(rh.double() @ rw.double().t(), labels, shift=True)
    B = h.shape[0] // 2
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = linear_dpo_loss(hh, ww, labels, ref_hidden=rh, ref_weight=rw, backend="torch")
    gh, gw = torch.autograd.grad(loss, (hh, ww))
    loss2, grads2, _ = ours(h, w, None, labels, rs[:B].float(), rs[B:].float(), extra,
                            kind="sigmoid", backend="torch")
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, grads2[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw, grads2[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend_name", ["torch", "native"])
@pytest.mark.parametrize("kind", ["ipo", "sigmoid_norm", ["sigmoid_norm", "sft"]])
def test_given_completion_lengths(backend_name, kind):
    """chosen_lengths / rejected_lengths replace the label counts, as dpo_loss takes them (TRL
    counts the unshifted completion mask: one more when the prompt is empty)."""
    data = batch(seed=7)
    B = data[0].shape[0] // 2
    nc = torch.tensor([9.0, 4.0, 7.0])
    nr = torch.tensor([5, 8, 6])  # integer counts are accepted too
    check_all(data, kind=kind, backend=backend_name, chosen_lengths=nc, rejected_lengths=nr)
    loss, _, _ = ours(*data, kind=kind, backend=backend_name)
    loss_n, _, _ = ours(*data, kind=kind, backend=backend_name, chosen_lengths=nc,
                        rejected_lengths=nr)
    assert B == 3 and loss_n != loss


def test_per_pair_metrics():
    data = batch(seed=8)
    B = data[0].shape[0] // 2
    _, _, m = ours(*data, kind="sigmoid", backend="torch")
    _, _, mp = ours(*data, kind="sigmoid", backend="torch", per_pair_metrics=True)
    assert set(m) == set(mp)
    for k in m:
        assert mp[k].shape == (B,) and m[k].shape == ()
        torch.testing.assert_close(mp[k].mean(), m[k])
    check_all(data, kind="sigmoid", backend="torch", per_pair_metrics=True)


@pytest.mark.parametrize("backend_name", ["torch", "native"])
@pytest.mark.parametrize("opts", [{}, dict(softcap=3.0, temperature=0.7, chunk_rows=9),
                                  dict(batch_invariant=True, average=True),
                                  dict(chunk_rows=5), dict(chunk_rows=7, softcap=3.0)])
@pytest.mark.parametrize("trainable", [False, True])
def test_pair_logps_are_the_losss_bits(backend_name, opts, trainable):
    """linear_pair_logps gives linear_dpo_loss's own policy log-probs bit for bit with a
    trainable head (so a reference equal to the policy cancels exactly), pairs kept whole or
    streamed (chunk_rows under a pair: on the native backend the first pair's forward runs in
    slabs, and so does the reference's), and with a frozen head (whose native policy pass is the
    frozen-head kernel, forming the forward's statistics); they match the float64 oracle."""
    from fastdpo import linear_pair_logps
    h, w, b, labels, rc, rr, _ = batch(seed=5, bias=True)
    g = torch.Generator().manual_seed(1)
    tw = torch.rand(labels.shape, generator=g) + 0.5
    kw = dict(bias=b, backend=backend_name, token_weights=tw, **opts)
    pc, pr = linear_pair_logps(h, w, labels, **kw)
    assert not pc.requires_grad and pc.shape == (h.shape[0] // 2,)
    hh = h.clone().requires_grad_()
    w = w.clone().requires_grad_(trainable)
    _, m = linear_dpo_loss(hh, w, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                           per_pair_metrics=True, **kw)
    assert torch.equal(m["logps/chosen"], pc) and torch.equal(m["logps/rejected"], pr)
    _, m = linear_dpo_loss(hh, w, labels, ref_chosen_logps=pc, ref_rejected_logps=pr,
                           per_pair_metrics=True, **kw)
    assert (m["rewards/chosen"] == 0).all() and (m["rewards/margins"] == 0).all()
    z = R.head_logits(h.double(), w.double(), b.double(),
                      softcap=opts.get("softcap"))
    s64 = R.sequence_logps(z, labels, shift=True, temperature=opts.get("temperature", 1.0),
                           token_weights=tw, average=opts.get("average", False),
                           dtype=torch.float64)
    z32 = R.head_logits(h, w, b, softcap=opts.get("softcap"))
    s32 = R.sequence_logps(z32, labels, shift=True, temperature=opts.get("temperature", 1.0),
                           token_weights=tw, average=opts.get("average", False),
                           dtype=torch.float32)
    assert_rule(torch.cat([pc, pr]), s64, s32, torch.float32, what="pair logps")


@pytest.mark.parametrize("chunk_rows", [None, 7, 5])
def test_streamed_pairs_reference_equal_to_policy_cancels_exactly(chunk_rows):
    """A trainable head's pairs streamed on the native backend: the reference pass (here the
    policy's own weights) groups its forward calls as the policy's kept slabs do, so every
    reward is exactly 0 (a 7-row matmul's bits can differ from the same rows inside a larger
    one: rewards/rejected was 1.5e-6 before the reference followed the slabs)."""
    torch.manual_seed(0)
    B, T, H, V = 3, 20, 16, 300
    h = torch.randn(2 * B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (2 * B, T))
    labels[:, :4] = -100
    loss, m = linear_dpo_loss(h, w, labels, ref_hidden=h.detach(), ref_weight=w.detach(),
                              chunk_rows=chunk_rows, backend="native", per_pair_metrics=True)
    assert (m["rewards/chosen"] == 0).all() and (m["rewards/rejected"] == 0).all()
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-7)


@pytest.mark.parametrize("opts", [{}, dict(chunk_rows=5), dict(chunk_rows=5, kind="aot"),
                                  dict(softcap=3.0, temperature=0.7),
                                  dict(batch_invariant=True), dict(frozen=True)])
def test_token_stats_are_the_passs_rows(backend, opts):
    """token_stats=True: each scored position's label log-prob, log-sum and entropy from the
    policy pass itself, against float64 under the rule (kept chunks, streamed pairs, a first
    pass, frozen head); the label is the row's max exactly when logp == -log_sum; 0 elsewhere;
    the loss and gradients are those without it."""
    opts = dict(opts)
    kind, frozen = opts.pop("kind", "sigmoid"), opts.pop("frozen", False)
    h, w, b, labels, rc, rr, extra = batch(seed=9, bias=True)
    T, softcap = opts.get("temperature", 1.0), opts.get("softcap")
    top = R.head_logits(h.double(), w.double(), b.double(), softcap=softcap).argmax(-1)
    pick = (labels[:, 1:] != -100) & (torch.arange(labels.shape[1] - 1) % 2 == 0)
    labels[:, 1:][pick] = top[:, :-1][pick]  # half the scored labels are their row's max
    kw = dict(bias=b, ref_chosen_logps=rc, ref_rejected_logps=rr, backend=backend,
              **loss_kwargs(kind), **opts)
    runs = []
    for stats in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(not frozen)
        out = linear_dpo_loss(hh, ww, labels, token_stats=stats, **kw)
        out[0].backward()
        runs.append((out, hh.grad, ww.grad))
    (loss, _), gh, gw = runs[0]
    (loss_t, _, st), gh_t, gw_t = runs[1]
    assert torch.equal(loss, loss_t) and torch.equal(gh, gh_t)
    assert (gw is None and gw_t is None) or torch.equal(gw, gw_t)
    y, scored = labels[:, 1:], labels[:, 1:] != -100

    def rows(dtype):
        z = R.head_logits(h.to(dtype), w.to(dtype), b.to(dtype), softcap=softcap)[:, :-1] / T
        lp = torch.log_softmax(z, -1)
        return (lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1),
                -(lp.exp() * lp).sum(-1), z)

    lp64, ent64, z64 = rows(torch.float64)
    lp32, ent32, _ = rows(torch.float32)
    assert st.logp.shape == labels.shape and st.logp.dtype == torch.float32
    for got, r64, r32 in ((st.logp, lp64, lp32), (st.entropy, ent64, ent32)):
        assert_rule(got[:, :-1][scored], r64[scored], r32[scored], torch.float32)
        assert (got[:, :-1][~scored] == 0).all() and (got[:, -1] == 0).all()
    top = z64.topk(2, -1).values
    clear = scored & (top[..., 0] - top[..., 1] > 1e-4)  # no near tie
    is_top = (st.logp + st.log_sum == 0)[:, :-1]
    assert torch.equal(is_top[clear], (z64.argmax(-1) == y)[clear]) and is_top[clear].any()


def test_given_lengths_and_pair_logps_errors_name_the_argument():
    from fastdpo import linear_pair_logps
    h, w, _, labels, rc, rr, _ = batch()
    ref = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch", loss_type="ipo")
    n = torch.ones(3)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        linear_dpo_loss(h, w, labels, chosen_lengths=n, **ref)
    with pytest.raises(ValueError, match=r"rejected_lengths must have shape \(3,\)"):
        linear_dpo_loss(h, w, labels, chosen_lengths=n, rejected_lengths=n[:2], **ref)
    with pytest.raises(TypeError, match="chosen_lengths must be a floating or integer tensor"):
        linear_dpo_loss(h, w, labels, chosen_lengths=n > 0, rejected_lengths=n, **ref)
    with pytest.raises(TypeError, match="chosen_lengths must be a torch.Tensor"):
        linear_dpo_loss(h, w, labels, chosen_lengths=[1, 2, 3], rejected_lengths=n, **ref)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_pair_logps(h[:5], w, labels[:5])
    with pytest.raises(ValueError, match="labels must lie"):
        bad = labels.clone()
        bad[1, 5] = 10_000
        linear_pair_logps(h, w, bad)


def test_bco_delta_callable_sees_the_batch():
    h, w, _, labels, rc, rr, _ = batch(seed=6)
    seen = {}

    def delta(pc, pr, rc_, rr_):
        seen["delta"] = (0.1 * torch.cat([pc - rc_, pr - rr_])).mean()
        return seen["delta"]

    out = []
    for d in (delta, None):
        hh = h.clone().requires_grad_()
        loss, _ = linear_dpo_loss(hh, w, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                  loss_type="bco_pair", bco_delta=d or seen["delta"],
                                  backend="torch")
        out.append((loss, *torch.autograd.grad(loss, hh)))
    assert seen["delta"].abs() > 0.1
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


def test_backward_scales_by_incoming_gradient_and_runs_once():
    h, w, _, labels, rc, rr, _ = batch(seed=8)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = linear_dpo_loss(hh, ww, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                              backend="torch")
    g1 = torch.autograd.grad(loss, (hh, ww), retain_graph=True)
    loss_b, _ = linear_dpo_loss(hh, ww, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                backend="torch")
    g3 = torch.autograd.grad(3.0 * loss_b, (hh, ww))
    for a, b in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, b)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        torch.autograd.grad(loss, (hh, ww))


def test_errors_name_the_argument():
    h, w, _, labels, rc, rr, _ = batch()
    ref = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch")
    with pytest.raises(ValueError, match="reduction"):
        linear_dpo_loss(h, w, labels, reduction="none", **ref)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_dpo_loss(h[:5], w, labels[:5], **ref)
    with pytest.raises(ValueError, match="reference"):
        linear_dpo_loss(h, w, labels, ref_hidden=h, ref_weight=w, **ref)
    with pytest.raises(ValueError, match="ref_chosen_logps must have shape"):
        linear_dpo_loss(h, w, labels, ref_chosen_logps=rc[:2], ref_rejected_logps=rr,
                        backend="torch")
    with pytest.raises(ValueError, match="labels must lie"):
        bad = labels.clone()
        bad[1, 5] = 10_000
        linear_dpo_loss(h, w, bad, **ref)
    with pytest.raises(ValueError, match="target_probs"):
        linear_dpo_loss(h, w, labels, loss_type="soft", **ref)
    with pytest.raises(ValueError, match="softcap"):
        linear_dpo_loss(h, w, labels, softcap=-1.0, **ref)


# ------------------------------------------------------------------------- matmul counts


def gemms(rows, H, V, **kw):
    h, w, _, labels, rc, rr, _ = batch(B=4, T=10, H=H, V=V, seed=1)
    n_rows = int((labels[:, 1:] != -100).sum())
    hh = h.clone().requires_grad_(rows[0])
    ww = w.clone().requires_grad_(rows[1])
    ref = kw.pop("ref", None)
    refkw = (dict(ref_hidden=h * 0.5, ref_weight=w) if ref else
             dict(ref_chosen_logps=rc, ref_rejected_logps=rr))
    with MatmulFlops() as fm:
        loss, _ = linear_dpo_loss(hh, ww, labels, backend="torch",
                                  chunk_rows=kw.pop("chunk_rows", 20), **refkw, **kw)
        if loss.requires_grad:
            loss.backward()
    fm.max_rows = max((e.input_shapes[0][0] for e in fm.prof.events()
                       if e.name == "aten::mm" and e.input_shapes[1][1] == V), default=0)
    return fm.macs / (n_rows * H * V), fm.max_rows


@pytest.mark.parametrize("rows,expected", [((True, True), 3), ((False, True), 2),
                                           ((True, False), 2), ((False, False), 1)])
def test_gemm_count(rows, expected):
    assert gemms(rows, 24, 97)[0] == expected


@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_pairs_over_the_budget_are_streamed(backend_name):
    """A pair with more rows than the chunk budget is not held whole: a first log-prob pass,
    then slabs of at most chunk_rows rows with the known pair gradients (4 matmuls instead of
    3); every loss type still matches the float64 oracle (check_all with small chunk_rows)."""
    macs, max_rows = gemms((True, True), 24, 97, chunk_rows=5)
    assert macs == 4 and 0 < max_rows <= 5
    macs, max_rows = gemms((True, True), 24, 97, chunk_rows=40)
    assert macs == 3 and max_rows > 5
    check_all(batch(seed=3), kind="ipo", backend=backend_name, chunk_rows=3)


def test_pair_limit_streams_without_chunk_rows(monkeypatch):
    """Without chunk_rows, pairs are kept whole (3 matmuls) unless one pair's fp32 logits exceed
    PAIR_LIMIT_BYTES (FASTDPO_LINEAR_PAIR_LIMIT_MB): then it is streamed, in chunk-budget slabs."""
    h, w, _, labels, rc, rr, _ = batch(B=4, T=10, H=24, V=97, seed=1)
    args = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, backend="torch")
    hh = h.clone().requires_grad_()
    with MatmulFlops() as fm:
        linear_dpo_loss(hh, w, labels, **args)[0].backward()
    assert AL.pair_limit_rows(128, 97, False) >= 128
    monkeypatch.setattr(AL, "PAIR_LIMIT_BYTES", 1)
    monkeypatch.setattr(AL, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(AL, "MIN_CHUNK_BYTES", 1)
    h2 = h.clone().requires_grad_()
    with MatmulFlops() as fs:
        loss = linear_dpo_loss(h2, w, labels, **args)[0]
        loss.backward()
    assert fs.macs == fm.macs * 3 // 2  # frozen weight: 2 matmuls -> a first pass + 2
    torch.testing.assert_close(h2.grad, hh.grad, rtol=1e-5, atol=1e-7)


def test_gemm_count_reference_and_batch_losses():
    assert gemms((True, True), 24, 97, ref=True)[0] == 4           # + the reference's logits
    assert gemms((True, False), 24, 97, loss_type="aot")[0] == 3   # a first log-prob pass


def test_chunks_hold_whole_pairs_within_the_cap():
    h, w, _, labels, *_ = batch(B=5, T=12)
    lab = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1).reshape(-1)
    weights = (lab != -100).float()
    pr = AL.build_rows(h.reshape(-1, h.shape[-1]), lab, weights, 5, 12, torch.float32)
    off = pr.offsets
    for cap in (1, 10, 25, 1000):
        chunks = AL.chunk_pairs(pr, cap)
        assert [j for c in chunks for j in range(*c)] == list(range(5))
        for j0, j1 in chunks:
            n = off[j1] - off[j0] + off[5 + j1] - off[5 + j0]
            assert n <= cap or j1 - j0 == 1


# ------------------------------------------------------- frozen head of linear_token_logps


@pytest.mark.parametrize("opts", [{}, dict(softcap=2.0, temperature=0.6, logit_scale=1.5)])
def test_frozen_head_token_logps(backend, opts):
    from fastdpo.linear import linear_token_logps

    h, w, b, labels, *_ = batch(B=2, T=7, H=12, V=41, bias=True, seed=12)
    hh = h.clone().requires_grad_()
    with MatmulFlops() as fm:
        lp = linear_token_logps(hh, w, labels, bias=b, shift=True, backend=backend, **opts)
        g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))
        (gh,) = torch.autograd.grad(lp, hh, g)
    n_rows = int((labels[:, 1:] != -100).sum())
    if backend != "triton":  # Triton's row kernels hold no matmul; the head's are counted here
        assert fm.macs == 2 * n_rows * 12 * 41
    outs = []
    for dtype in (torch.float64, torch.float32):
        h2 = h.to(dtype).requires_grad_()
        z = (h2 @ w.to(dtype).t() + b.to(dtype)) * opts.get("logit_scale", 1.0)
        if opts.get("softcap"):
            z = opts["softcap"] * torch.tanh(z / opts["softcap"])
        ref = R.token_logps(z, labels, shift=True, temperature=opts.get("temperature", 1.0),
                            dtype=dtype)
        outs.append((ref, torch.autograd.grad(ref, h2, g.to(dtype))[0]))
    assert_rule(lp, outs[0][0], outs[1][0], torch.float32, what="logps")
    assert_rule(gh, outs[0][1], outs[1][1], torch.float32, what="d hidden")


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_frozen_head_without_row_selection(monkeypatch, batch_invariant):
    """Off the CPU the frozen head takes every row (counting the labelled ones would sync the
    host): ignored rows are 0 from the row ops, and the labelled rows match the oracle."""
    from fastdpo.linear import linear_token_logps

    h, w, b, labels, *_ = batch(B=2, T=7, H=12, V=41, bias=True, seed=13)
    g = torch.randn(labels[:, 1:].shape, generator=torch.Generator().manual_seed(0))
    got, calls = {}, []
    for select in (True, False):
        if not select:
            monkeypatch.setattr(AL, "labelled_rows",
                                lambda labels, ignore_index: calls.append(1))
        hh = h.clone().requires_grad_()
        lp = linear_token_logps(hh, w, labels, bias=b, shift=True, backend="torch",
                                batch_invariant=batch_invariant, return_entropy="detached")
        got[select] = (*lp, *torch.autograd.grad(lp[0], hh, g))
    outs = []
    for dtype in (torch.float64, torch.float32):
        h2 = h.to(dtype).requires_grad_()
        ref = R.token_logps(h2 @ w.to(dtype).t() + b.to(dtype), labels, shift=True, dtype=dtype)
        outs.append((ref, torch.autograd.grad(ref, h2, g.to(dtype))[0]))
    lp, ent, gh = got[False]
    assert calls  # the frozen head's loop ran without a selection
    assert_rule(lp, outs[0][0], outs[1][0], torch.float32, what="logps")
    assert_rule(gh, outs[0][1], outs[1][1], torch.float32, what="d hidden")
    for a, c in zip(got[False], got[True]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    ignored = labels[:, 1:] == -100
    assert ignored.any() and (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (gh[:, :-1][ignored] == 0).all() and (gh[:, -1] == 0).all()


def test_frozen_head_detached_entropy(backend):
    """return_entropy="detached" (entropy as a metric, e.g. FastDPOTrainer's entropy logs)
    keeps the frozen head's 2 matmuls; its entropy equals the differentiable one and carries no
    graph, the log-probs and d hidden are the same as without entropy."""
    from fastdpo.linear import linear_token_logps

    h, w, b, labels, *_ = batch(B=2, T=7, H=12, V=41, bias=True, seed=14)
    hh = h.clone().requires_grad_()
    g = torch.randn(2 * 2, 6, generator=torch.Generator().manual_seed(1))
    with MatmulFlops() as fm:
        lp, ent = linear_token_logps(hh, w, labels, bias=b, shift=True, backend=backend,
                                     softcap=4.0, return_entropy="detached")
        (gh,) = torch.autograd.grad(lp, hh, g)
    n_rows = int((labels[:, 1:] != -100).sum())
    if backend != "triton":
        assert fm.macs == 2 * n_rows * 12 * 41
    assert not ent.requires_grad and ent.shape == lp.shape
    h2 = h.clone().requires_grad_()
    lp2, ent2 = linear_token_logps(h2, w, labels, bias=b, shift=True, backend=backend,
                                   softcap=4.0, return_entropy=True)
    (gh2,) = torch.autograd.grad(lp2, h2, g)
    torch.testing.assert_close(ent, ent2.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp, lp2.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh2, rtol=1e-5, atol=1e-6)
    seq, seq_ent = __import__("fastdpo").linear_sequence_logps(
        h.clone().requires_grad_(), w, labels, bias=b, shift=True, backend=backend,
        softcap=4.0, return_entropy="detached")
    assert not seq_ent.requires_grad and seq.requires_grad
    with pytest.raises(ValueError, match="return_entropy"):
        linear_token_logps(hh, w, labels, return_entropy="yes")


@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_token_logps_skips_ignored_rows(backend_name):
    """Trainable head: forward 1 + backward 3 matmuls, over the labelled rows only."""
    from fastdpo.linear import linear_token_logps

    h, w, b, labels, *_ = batch(B=2, T=9, H=12, V=41, bias=True, seed=13)
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    with MatmulFlops() as fm:
        lp = linear_token_logps(hh, ww, labels, bias=bb, shift=True, backend=backend_name)
        g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(lp, (hh, ww, bb), g)
    n_rows = int((labels[:, 1:] != -100).sum())
    assert fm.macs == 4 * n_rows * 12 * 41
    h64, w64, b64 = (t.double().requires_grad_() for t in (h, w, b))
    ref = R.token_logps(h64 @ w64.t() + b64, labels, shift=True)
    refg = torch.autograd.grad(ref, (h64, w64, b64), g.double())
    h32, w32, b32 = (t.clone().requires_grad_() for t in (h, w, b))
    lo = R.token_logps(h32 @ w32.t() + b32, labels, shift=True, dtype=torch.float32)
    log_ = torch.autograd.grad(lo, (h32, w32, b32), g)
    assert_rule(lp, ref, lo, torch.float32, what="logps")
    assert torch.equal(lp[labels[:, 1:] == -100], torch.zeros_like(lp[labels[:, 1:] == -100]))
    for a, r, e in zip(grads, refg, log_):
        assert_rule(a, r, e, torch.float32, what="grad")


# ------------------------------------------------------------------------ batch invariance


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_batch_invariant_pair_results(backend, kind):
    """A pair's log-probs, loss and d hidden rows are bitwise the same in any batch."""
    h, w, _, labels, rc, rr, _ = batch(B=6, T=30, H=16, V=300, seed=21)
    labels[0, :11] = labels[6, :13] = -100  # pair 0 alone makes a 2-row matmul
    labels[0, 12:] = labels[6, 14:] = -100
    labels[0, 11], labels[6, 13] = 5, 7
    results = []
    for pick, rows in (([0, 1], 1000), ([0, 2, 3, 4, 5, 1], 50), ([3, 0], 2)):
        idx = torch.tensor(pick + [p + 6 for p in pick])
        hh = h[idx].clone().requires_grad_()
        loss, m = linear_dpo_loss(hh, w, labels[idx], ref_chosen_logps=rc[pick],
                                  ref_rejected_logps=rr[pick], loss_type=kind, reduction="sum",
                                  backend=backend, chunk_rows=rows, batch_invariant=True)
        (gh,) = torch.autograd.grad(loss, hh)
        k0 = pick.index(0)
        results.append(gh[[k0, k0 + len(pick)]])
    for r in results[1:]:
        assert torch.equal(r, results[0])


@pytest.mark.parametrize("frozen", [False, True])
def test_native_head_at_a_model_sized_hidden(frozen):
    """H = 4096 (a real model's): the native backward takes its tokens in blocks, which must start
    on the kept forward's tiles (those of a chunk of 1000 rows are balanced, not 256-row ones).
    It returned gradients 1e-2 off. A frozen head's pass, many vocabulary blocks: its log-probs
    are the reference pass's bit for bit, so the rewards start at exactly 0."""
    from fastdpo import linear_pair_logps
    data = batch(B=2, T=260, H=4096, V=1500, seed=31)
    data[0].mul_(0.05)
    if not frozen:
        check_all(data, kind="sigmoid", backend="native")
        return
    h, w, _, labels, *_ = data
    pc, pr = linear_pair_logps(h, w, labels, backend="native")
    hh = h.clone().requires_grad_()
    _, m = linear_dpo_loss(hh, w, labels, ref_chosen_logps=pc, ref_rejected_logps=pr,
                           backend="native", per_pair_metrics=True)
    assert (m["rewards/chosen"] == 0).all() and (m["rewards/margins"] == 0).all()


def test_segment_sums_depend_on_the_segment_alone():
    """The fused passes' sequence sums (segment_sums): a segment's bits are the same alone, among
    other segments, in any order and padded to any width (no index_add_, whose order is not
    deterministic on CUDA); within the pairwise bound of the exact sum; NaN and inf stay in
    their own segment; an empty segment sums to +0.0."""
    import math

    from fastdpo.autograd.linear_stream import segment_sums
    g = torch.Generator().manual_seed(4)
    lengths = [0, 1, 2, 3, 7, 64, 65, 1000, 5]
    segs = [torch.randn(n, generator=g, dtype=torch.float64)
            * 10.0 ** torch.randint(-8, 8, (n,), generator=g) for n in lengths]
    segs[3][1], segs[8][2] = math.nan, math.inf
    def sums(parts, lens):
        seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        return segment_sums(torch.cat(parts), seq, lens)

    together = sums(segs, lengths)
    for i, v in enumerate(segs):
        assert torch.equal(sums([v], [v.numel()]).nan_to_num(7.0),
                           together[i:i + 1].nan_to_num(7.0)), i
        longer = [v, torch.randn(4000, generator=g, dtype=torch.float64)]  # a wider tree
        assert torch.equal(sums(longer, [v.numel(), 4000])[:1].nan_to_num(7.0),
                           together[i:i + 1].nan_to_num(7.0)), i
    perm = [7, 2, 0, 8, 5, 1, 6, 4, 3]
    shuffled = sums([segs[i] for i in perm], [lengths[i] for i in perm])
    assert torch.equal(shuffled.nan_to_num(7.0), together[perm].nan_to_num(7.0))
    assert together[3].isnan() and together[8] == math.inf
    assert together[0] == 0 and math.copysign(1.0, together[0]) == 1.0
    for i in (1, 2, 4, 5, 6, 7):
        v = segs[i].tolist()
        exact = math.fsum(v)
        bound = (math.log2(len(v)) + 1) * 2.0 ** -52 * math.fsum(abs(x) for x in v)
        assert abs(together[i].item() - exact) <= bound, i


def test_batch_invariant_is_accurate():
    check_all(batch(seed=22), kind="sigmoid", backend="torch", batch_invariant=True,
              chunk_rows=5)


@pytest.mark.parametrize("row_backend", ["torch", "native"])
def test_batch_invariant_fused_head_loops(row_backend):
    """forward_loop / backward_loop / frozen_head_forward with batch_invariant: a row's outputs
    (log-prob, row statistics, d hidden) are bitwise the same in batches of any size."""
    from fastdpo.autograd.linear_loss import frozen_head_forward
    from fastdpo.torch_backend import linear as L

    g = torch.Generator().manual_seed(3)
    N, H, V = 300, 16, 700
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    gl = torch.randn(N, generator=g)
    seen = []
    for rows in (torch.arange(N), torch.tensor([7, 0, 5]), torch.tensor([0]),
                 torch.arange(0, N, 2)):
        args = (h[rows], w, None, labels[rows], -100, 1.0, 1.0, 0.0)
        fw = L.forward_loop(row_backend, *args, 0, V, False, batch_invariant=True)
        d_h, _, _ = L.backward_loop(L.RowKernelTiles(row_backend), gl[rows], None, h[rows], w,
                                    None, labels[rows], fw[1], fw[2], None, -100, 1.0, 1.0, 0.0,
                                    0, V, True, True, False, batch_invariant=True)
        fz = frozen_head_forward(row_backend, *args, batch_invariant=True)
        k = int((rows == 0).nonzero())
        seen.append(torch.stack([fw[0][k], fw[1][k], fw[2][k], fz[0][k]]).tolist()
                    + d_h[k].tolist() + fz[3][k].tolist())
    assert all(s == seen[0] for s in seen[1:])
    full = L.forward_loop(row_backend, h, w, None, labels, -100, 1.0, 1.0, 0.0, 0, V, False)
    torch.testing.assert_close(torch.tensor(seen[0][0]), full[0][0])


def test_extra_memory_is_one_chunk_of_logits(monkeypatch):
    """Beyond the gradients it returns, the pass holds one chunk's fp32 logits plus O(rows * H)."""
    from test_linear import LiveBytes

    monkeypatch.setattr(AL, "MIN_CHUNK_BYTES", 0)
    monkeypatch.setattr(AL, "MIN_CHUNK_ROWS", 1)
    h, w, _, labels, rc, rr, _ = batch(B=8, T=40, H=32, V=4096, seed=30)
    N, H, V = 16 * 40, 32, 4096
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with LiveBytes() as m:
        loss, _ = linear_dpo_loss(hh, ww, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                  backend="native")
        peak = m.peak
    lab = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1).reshape(-1)
    pr = AL.build_rows(h.reshape(N, H), lab, (lab != -100).float(), 8, 40, torch.float32)
    cap = AL.plan_rows(N, V, 4, False)
    assert cap < N // 10  # the budget really splits the batch
    chunk = max(pr.offsets[j1] - pr.offsets[j0] + pr.offsets[8 + j1] - pr.offsets[8 + j0]
                for j0, j1 in AL.chunk_pairs(pr, cap))
    grads = (N * H + V * H) * 4
    assert peak - grads <= chunk * V * 4 + 8 * N * H * 4, (peak, grads, chunk * V * 4)
    assert chunk * V * 4 <= max(0.05 * N * V * 4, 2 * 40 * V * 4)  # 5%, or one pair


def test_masked_vocabulary_and_strided_hidden(backend):
    """-inf bias entries (a masked vocabulary) and hidden states that are not contiguous."""
    h, w, b, labels, rc, rr, extra = batch(B=2, T=8, H=10, V=40, bias=True, seed=31)
    b[::3] = float("-inf")
    labels[labels % 3 == 0] = 1  # labels only on unmasked entries
    h_strided = torch.cat([h, h], -1)[..., ::2]
    assert not h_strided.is_contiguous()
    check_all((h_strided, w, b, labels, rc, rr, extra), kind="sigmoid", backend=backend,
              chunk_rows=3)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "sft"])
def test_agrees_with_dpo_module(kind):
    from fastdpo import DPOLoss

    h, w, _, labels, rc, rr, _ = batch(seed=40)
    outs = []
    for fn in ("module", "fused"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if fn == "module":
            loss, m = DPOLoss(beta=0.2, loss_type=kind, backend="torch")(
                labels=labels, hidden=hh, weight=ww, ref_logps=(rc, rr))
        else:
            loss, m = linear_dpo_loss(hh, ww, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                      beta=0.2, loss_type=kind, backend="torch")
        outs.append((loss, *torch.autograd.grad(loss, (hh, ww)), *m.values()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_weights_follow_sequence_logps_semantics():
    """Same weighting rules as sequence_logps: an ignored token's weight is never read (NaN
    there changes nothing), and average divides by a negative weight sum too."""
    data = list(batch(seed=13))
    labels = data[3]
    g = torch.Generator().manual_seed(2)
    tw = torch.rand(labels.shape, generator=g) - 0.8  # mostly negative: negative sums
    tw = torch.where(labels == -100, float("nan"), tw)
    check_all(tuple(data), kind="sigmoid", backend="torch", token_weights=tw, average=True,
              chunk_rows=6)


@pytest.mark.parametrize("backend_name", ["torch", "native"])
def test_frozen_head_under_autocast(backend_name):
    """Under CPU autocast the frozen head's Python loop had its matmuls cast to bf16 and failed
    (index_copy_ of bf16 into fp32); it computes as for bf16 hidden states outside autocast."""
    from fastdpo.linear import linear_token_logps

    h, w, b, labels, *_ = batch(B=2, T=7, H=12, V=41, bias=True, seed=15)
    hh = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_token_logps(hh, w, labels, bias=b, shift=True, backend=backend_name)
    (gh,) = torch.autograd.grad(lp.sum(), hh)
    h2 = h.to(torch.bfloat16).requires_grad_()
    lp2 = linear_token_logps(h2, w, labels, bias=b, shift=True, backend=backend_name)
    (gh2,) = torch.autograd.grad(lp2.sum(), h2)
    torch.testing.assert_close(lp, lp2, rtol=0, atol=0)
    torch.testing.assert_close(gh, gh2.float(), rtol=1e-2, atol=1e-3)


# ------------------------------------------------- passes without d_weight: the native ops


def _record(monkeypatch, name):
    """Wrap the pass ``AL.<name>`` that run_pairs hands over to; returns the list of each call's
    7th argument (``native_pass``: ``grads``, True for a frozen-head policy pass)."""
    calls = []
    real = getattr(AL, name)
    monkeypatch.setattr(AL, name, lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    return calls


def _spy_native(monkeypatch):
    """Record each pass run_pairs hands to the native ops and make the Python loop fail, so a
    test sees which path ran."""
    calls = _record(monkeypatch, "native_pass")

    def no_loop(*a, **k):
        raise AssertionError("the Python chunk loop ran")

    monkeypatch.setattr(AL, "logits_tile", no_loop)
    return calls


FROZEN_KINDS = ["sigmoid", "ipo", "soft", "distill", "sft", "bco_pair", "apo_down",
                ["sigmoid", "sft"]]


@pytest.mark.parametrize("kind", FROZEN_KINDS)
def test_frozen_head_dpo_takes_the_native_op(kind, monkeypatch):
    """A frozen head (LoRA/PEFT): the policy pass is the native frozen-head op (d logp / d hidden
    in the same sweep), values and d hidden against the float64 oracle; no Python loop."""
    data = batch(B=3, T=9, H=16, V=53, seed=31, bias=True)
    h, w, b, labels, rc, rr, extra = data
    calls = _spy_native(monkeypatch)
    hh = h.clone().requires_grad_()
    s = extra["target_probs"].clone().requires_grad_() if "soft" in kind else None
    m = extra["reward_margins"].clone().requires_grad_() if "distill" in kind else None
    loss, metrics = linear_dpo_loss(hh, w, labels, bias=b, ref_chosen_logps=rc,
                                    ref_rejected_logps=rr, target_probs=s, reward_margins=m,
                                    backend="native", temperature=0.8, softcap=5.0,
                                    **loss_kwargs(kind))
    wrt = [t for t in (hh, s, m) if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    assert calls and calls[-1] is True
    monkeypatch.undo()
    # the oracle's gradients: hidden, weight, bias, then target_probs / reward_margins
    assert_oracle(loss, grads, metrics, data, grad_index=[0, 3, 4][:len(grads)], kind=kind,
                  temperature=0.8, softcap=5.0)


def test_native_passes_equal_the_python_loop(monkeypatch):
    """The reference pass (no grad) and a frozen policy pass through the native ops give what the
    Python chunk loop gives (same rows, same sums, the pair gradients in the same chunk order)."""
    h, w, b, labels, _, _, _ = batch(B=4, T=11, H=16, V=300, seed=32, bias=True)
    g = torch.Generator().manual_seed(5)
    rh, rw = torch.randn(h.shape, generator=g), w + 0.1 * torch.randn(w.shape, generator=g)
    weights = torch.rand(labels.shape, generator=g)
    weights[:, 5] = 0.0  # zero-weight rows are skipped like ignored ones

    def run(native):
        if not native:
            monkeypatch.setattr(AL, "native_applies", lambda *a: False)
        hh = h.clone().requires_grad_()
        loss, mets = linear_dpo_loss(hh, w, labels, bias=b, ref_hidden=rh, ref_weight=rw,
                                     token_weights=weights, backend="native", chunk_rows=30,
                                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
        monkeypatch.undo()
        return loss, torch.autograd.grad(loss, hh)[0], mets

    calls = _record(monkeypatch, "native_pass")
    got = run(True)
    assert calls == [False, True]  # the reference pass, then the policy's
    want = run(False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-6, atol=1e-5)


def _spy_kept(monkeypatch):
    """Count the kept-chunk C++ calls of a trainable head; the Python loop's GEMMs must not run."""
    from fastdpo.autograd.linear_native import KeptChunks

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(KeptChunks, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(KeptChunks, name, spy)

    def no_loop(*a, **k):
        raise AssertionError("the Python chunk loop ran")

    monkeypatch.setattr(AL, "logits_tile", no_loop)
    return calls


@pytest.mark.parametrize("opts", [dict(), dict(softcap=3.0, logit_scale=1.7, temperature=0.6),
                                  dict(average=True, reduction="sum")])
def test_trainable_head_runs_each_chunk_in_cpp(opts, monkeypatch):
    """A trainable head: each chunk is two C++ calls (logits kept, no recompute), the reference
    pass one native op; values and every gradient (bias too) against the float64 oracle."""
    data = batch(B=4, T=10, H=16, V=300, seed=34, bias=True)
    calls = _spy_kept(monkeypatch)
    native = _record(monkeypatch, "native_pass")
    loss, grads, metrics = ours(*data, kind=["sigmoid", "sft"], backend="native",
                                loss_weights=[1.0, 0.3], chunk_rows=25, **opts)
    monkeypatch.undo()
    assert calls["forward"] == calls["backward"] >= 2  # one pair of calls per chunk
    assert native == []  # reference log-probs given
    assert_oracle(loss, grads, metrics, data, kind=["sigmoid", "sft"], loss_weights=[1.0, 0.3],
                  **opts)


def test_kept_chunks_equal_the_python_loop(monkeypatch):
    """The C++ chunk (logits kept) gives what the Python loop gives, bf16 inputs too."""
    from fastdpo.autograd.linear_native import KeptChunks

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        data = batch(B=3, T=12, H=16, V=300, seed=35, bias=True, dtype=dtype)
        got = ours(*data, kind="ipo", backend="native", chunk_rows=30, softcap=4.0)
        monkeypatch.setattr(KeptChunks, "applies", staticmethod(lambda *a: False))
        want = ours(*data, kind="ipo", backend="native", chunk_rows=30, softcap=4.0)
        monkeypatch.undo()
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_batch_invariant_trainable_head(kind, monkeypatch):
    """batch_invariant with a trainable head on the native backend (the C++ chunks): a pair's
    d hidden rows (so its log-probs and loss, which they scale by) are bitwise the same in any
    batch."""
    h, w, _, labels, rc, rr, _ = batch(B=6, T=30, H=16, V=300, seed=36)
    labels[0, :11] = labels[6, :13] = -100
    calls = _spy_kept(monkeypatch)
    results = []  # chunks of 1 to 6 pairs (a pair has at most 58 rows: none is streamed)
    for pick, rows in (([0, 1], 1000), ([0, 2, 3, 4, 5, 1], 60), ([3, 0], 130)):
        idx = torch.tensor(pick + [p + 6 for p in pick])
        hh, ww = h[idx].clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = linear_dpo_loss(hh, ww, labels[idx], ref_chosen_logps=rc[pick],
                                  ref_rejected_logps=rr[pick], loss_type=kind, reduction="sum",
                                  backend="native", chunk_rows=rows, batch_invariant=True)
        gh, _ = torch.autograd.grad(loss, (hh, ww))
        k0 = pick.index(0)
        results.append(gh[[k0, k0 + len(pick)]])
    assert calls["backward"] >= 3
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_kept_ops_refuse_bad_buffers():
    """The C++ ops check the buffer and the accumulators they write, by name."""
    from fastdpo import ops
    from fastdpo.native import _C

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 8, generator=g), torch.randn(40, 8, generator=g)
    lab = torch.randint(0, 40, (10,), generator=g)
    fwd, bwd = ops.get_op("native", "linear_keep_fwd"), ops.get_op("native", "linear_keep_bwd")
    args = (-100, 1.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="keep holds"):
        fwd(h, w, None, lab, *args, torch.empty(_C.linear_keep_numel(10, 40, 8) - 1))
    keep = torch.empty(_C.linear_keep_numel(10, 40, 8))
    lp, m, s, _ = fwd(h, w, None, lab, *args, keep)
    with pytest.raises(RuntimeError, match="d_weight must be"):
        bwd(keep, torch.ones(10), h, w, None, lab, m, s, *args, True, torch.zeros(40, 7),
            torch.empty(0))
    with pytest.raises(RuntimeError, match="d_bias given without a bias"):
        bwd(keep, torch.ones(10), h, w, None, lab, m, s, *args, True, torch.empty(0),
            torch.zeros(40))


@pytest.mark.parametrize("case", ["batch_type", "batch_type_streamed"])
def test_second_pass_after_a_native_first_pass_recomputes_in_cpp(case, monkeypatch):
    """A loss needing the whole batch first on the native backend: the first pass is the native
    forward (its row statistics kept), the second the native backward recomputing each tile's
    logits in cache: no Python loop, no kept chunk; values and every gradient against the
    float64 oracle."""
    data = batch(B=3, T=14, H=16, V=200, seed=37, bias=True)
    kept = _spy_kept(monkeypatch)
    recomputed = _record(monkeypatch, "recompute_pass")
    kw = dict(kind=["sigmoid", "aot", "sft"], loss_weights=[0.5, 0.3, 0.2])
    if case == "batch_type_streamed":
        kw.update(chunk_rows=6, softcap=3.0, temperature=0.7)
    loss, grads, metrics = ours(*data, backend="native", **kw)
    assert len(recomputed) == 1 and kept == {"forward": 0, "backward": 0}
    monkeypatch.undo()
    assert_oracle(loss, grads, metrics, data, **kw)


def _kept_rows(monkeypatch):
    """The rows of each kept-chunk C++ call, per method, in call order."""
    from fastdpo.autograd.linear_native import KeptChunks

    rows = {"forward": [], "backward": [], "stats": [], "recompute": []}
    for name in rows:
        real = getattr(KeptChunks, name)

        def spy(self, h, *a, _real=real, _name=name, **k):
            rows[_name].append(h.shape[0])
            return _real(self, h, *a, **k)

        monkeypatch.setattr(KeptChunks, name, spy)
    return rows


@pytest.mark.parametrize("case", ["sigmoid", "ipo_average", "sft", "soft_distill",
                                  "ipo_told_margin"])
def test_streamed_pairs_stay_in_the_chunk_loop(case, monkeypatch):
    """Pairs over the chunk budget on the native backend are streamed pair by pair in the chunk
    loop, with no first pass over the batch. For a loss of the margin alone the first pair is
    one sweep of kept slabs of at most chunk_rows (3 matmuls: d_weight formed at a unit scale,
    then scaled); otherwise (sft; ipo, which divides by the two lengths) it streams as the
    later pairs do: the native forward (in slabs, as the reference's) and the native backward
    recomputing its logits (4). Told margin-only wrongly, the sweep's d_weight is formed afresh
    by the recomputing backward. Values and every gradient against the float64 oracle."""
    data = batch(B=3, T=14, H=16, V=200, seed=37, bias=True)
    rows = _kept_rows(monkeypatch)
    recomputed = _record(monkeypatch, "recompute_pass")
    kw = {"sigmoid": dict(kind="sigmoid", softcap=3.0, temperature=0.7),
          "ipo_average": dict(kind="ipo", average=True, reduction="sum"),
          "sft": dict(kind=["sigmoid", "sft"], loss_weights=[0.7, 0.3]),
          "ipo_told_margin": dict(kind="ipo", average=True, reduction="sum"),
          "soft_distill": dict(kind=["soft", "distill"])}[case]
    if case == "ipo_told_margin":
        from fastdpo.losses import fused_linear
        monkeypatch.setattr(fused_linear, "margin_only", lambda cfg: True)
    loss, grads, metrics = ours(*data, backend="native", chunk_rows=6, **kw)
    monkeypatch.undo()
    assert not recomputed and max(rows["forward"] + rows["backward"] + [0]) <= 6
    n = (data[3][:, 1:] != -100).sum(1).tolist()
    first, later = n[0] + n[3], [n[1] + n[4], n[2] + n[5]]
    if case in ("sft", "ipo_average"):
        assert rows["forward"] == rows["backward"] == []
        assert max(rows["stats"][:-2]) <= 6 and sum(rows["stats"][:-2]) == first
        assert rows["stats"][-2:] == later and rows["recompute"] == [first] + later
    else:
        assert sum(rows["forward"]) == sum(rows["backward"]) == first
        assert rows["stats"] == later
        again = [first] if case == "ipo_told_margin" else []
        assert rows["recompute"] == again + later
    assert_oracle(loss, grads, metrics, data, **kw)


@pytest.mark.parametrize("kind,beta", [("sigmoid", 50.0), ("hinge", 50.0), ("sigmoid", 1e-4),
                                       (["sigmoid", "sft"], 20.0)])
def test_streamed_first_pair_at_extreme_inputs(kind, beta):
    """The scaled sweep where the pair gradient saturates (exactly 0 for a satisfied hinge, or
    a tiny sigmoid) or is tiny, on a sharp softmax beside a large logit offset."""
    data = list(batch(seed=13, bias=True))
    data[0] = data[0] * 30
    data[2] = data[2] + 1e4
    check_all(tuple(data), kind=kind, backend="native", chunk_rows=5, beta=beta,
              **({"loss_weights": [1.0, 0.5]} if isinstance(kind, list) else {}))


@pytest.mark.parametrize("kind,kw", [("sft", {}),
                                     (["sigmoid", "sft"], dict(loss_weights=[1e-3, 1.0])),
                                     ("ipo", {}), ("sigmoid", {}), ("ipo", {"told": True})])
def test_streamed_first_pair_keeps_d_weight_precision(kind, kw, monkeypatch):
    """A long coherent rejected part beside 2 chosen rows, where g_rejected is ~0 and not
    -g_chosen (sft): forming d_weight as g_c * (A_c - A_r) + (g_c + g_r) * A_r would cancel
    A_r's magnitude away (8.7e-4 relative error against float64, over the rule); the first
    streamed pair is scaled in place only when g_r == -g_c exactly (also when the loss layer
    wrongly says so: "told"). The 400-token sums are accumulated in float64: ipo's loss was
    over the rule on every backend with running fp32 sums."""
    if kw.pop("told", False):
        from fastdpo.losses import fused_linear
        monkeypatch.setattr(fused_linear, "margin_only", lambda cfg: True)
    torch.manual_seed(0)
    nc, nr, H, V = 2, 400, 8, 16
    h = torch.randn(2, nr + 2, H)
    h[1] = h[1, :1] * 5.0
    labels = torch.full((2, nr + 2), -100)
    labels[0, 1:1 + nc] = torch.randint(0, V, (nc,))
    labels[1, 1:1 + nr] = 3
    data = (h, torch.randn(V, H) * 0.3, None, labels, torch.tensor([-5.0]),
            torch.tensor([-5.0]), {})
    check_all(data, kind=kind, backend="native", chunk_rows=50, reduction="sum", **kw)


@pytest.mark.parametrize("kind", [t for t in LOSS_TYPES if t not in ("aot", "aot_unpaired")])
def test_every_loss_type_streamed_on_native(kind):
    """Every pair streamed (chunk_rows under a pair), the first one through the scaled sweep."""
    check_all(batch(seed=LOSS_TYPES.index(kind) + 40), kind=kind, backend="native", chunk_rows=4)
