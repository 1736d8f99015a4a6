"""The loss modules from logits / hidden states: DPOLoss's reference-free mode, average_log_prob
and NLL term; CPOLoss, ORPOLoss, KTOLoss against the functional losses on eager log-probs, and
what they keep for backward. (Against TRL's trainers: test_reference_free_trl_parity.py.)"""

import pytest
import torch
import torch.nn.functional as F

import fastdpo
import fastdpo.losses as L
from fastdpo.bench.memory import saved_for_backward

B, T, V, H = 3, 9, 64, 16


def batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=dtype) * 2
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    pos = torch.arange(T)
    prompt = torch.randint(1, 4, (2 * B, 1), generator=g)
    end = torch.randint(5, T + 1, (2 * B, 1), generator=g)
    labels = ids.masked_fill((pos < prompt) | (pos >= end), -100)
    return logits, labels, ids.masked_fill(pos >= end, -100)


def eager(logits, labels):
    """Summed shifted log-probs and counts, plain torch."""
    lab = labels[:, 1:]
    mask = lab != -100
    lp = F.log_softmax(logits[:, :-1], -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1), mask.sum(-1)


def run(fn, logits):
    x = logits.clone().requires_grad_(True)
    loss, metrics = fn(x)
    loss.backward()
    return loss.detach(), x.grad, metrics


def test_dpo_reference_free_is_cpo_sigmoid():
    logits, labels, _ = batch(1)
    a = run(lambda x: L.DPOLoss(beta=0.3, reference_free=True)(x, labels), logits)
    b = run(lambda x: L.CPOLoss(beta=0.3, cpo_alpha=0.0)(x, labels), logits)
    torch.testing.assert_close(a[:2], b[:2], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="reference_free=True takes no"):
        L.DPOLoss(reference_free=True)(logits, labels, ref_logps=torch.zeros(2 * B))
    with pytest.raises(ValueError, match="reference_free=True"):
        L.DPOLoss()(logits, labels)  # the error tells how to run without a reference


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_dpo_average_log_prob_and_nll_match_eager(kind):
    logits, labels, _ = batch(2)
    ref_logits = torch.randn_like(logits)
    beta, w = 0.4, 0.7

    def eager_loss(x):
        s, n = eager(x, labels)
        rs, _ = eager(ref_logits, labels)
        a, ra = s / n, rs / n
        d = (a[:B] - ra[:B]) - (a[B:] - ra[B:])
        per = {"sigmoid": -F.logsigmoid(beta * d), "ipo": (d - 1 / (2 * beta)) ** 2,
               "hinge": torch.relu(1 - beta * d)}[kind]
        nll = -s[:B].sum() / n[:B].sum()
        return per.mean() + w * nll, {"nll_loss": nll}

    crit = L.DPOLoss(beta=beta, loss_type=kind, average_log_prob=True, nll_weight=w)
    ours = run(lambda x: crit(x, labels, ref_logits=ref_logits), logits)
    ref = run(eager_loss, logits)
    torch.testing.assert_close(ours[:2], ref[:2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[2]["nll_loss"], ref[2]["nll_loss"].detach())
    s, n = eager(logits, labels)
    torch.testing.assert_close(ours[2]["logps/chosen"], (s[:B] / n[:B]).mean())


def test_dpo_nll_weight_equals_sft_loss_type():
    logits, labels, _ = batch(3)
    ref = torch.randn(2 * B, dtype=torch.float64)
    a = run(lambda x: L.DPOLoss(nll_weight=0.5)(x, labels, ref_logps=ref), logits)
    b = run(lambda x: L.DPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])(
        x, labels, ref_logps=ref), logits)
    torch.testing.assert_close(a[:2], b[:2], rtol=1e-12, atol=1e-14)
    assert "nll_loss" in a[2] and "nll_loss" not in b[2]


@pytest.mark.parametrize("kw", [dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.8),
                                dict(loss_type="sigmoid", cpo_alpha=1.0, label_smoothing=0.1),
                                dict(loss_type="ipo", alpha=0.2)])
def test_cpo_module_matches_functional(kw):
    logits, labels, _ = batch(4)
    ours = run(lambda x: L.CPOLoss(beta=0.5, **kw)(x, labels), logits)

    def ref(x):
        s, n = eager(x, labels)
        return L.cpo_loss(s[:B], s[B:], beta=0.5, chosen_lengths=n[:B], rejected_lengths=n[B:],
                          **kw)
    theirs = run(ref, logits)
    torch.testing.assert_close(ours[:2], theirs[:2], rtol=1e-10, atol=1e-12)
    assert ours[2].keys() == theirs[2].keys()


def test_orpo_module_nll_over_prompt_and_completion():
    logits, labels, nll_labels = batch(5)
    ours = run(lambda x: L.ORPOLoss(beta=0.3)(x, labels, nll_labels=nll_labels), logits)

    def ref(x):
        s, n = eager(x, labels)
        ns, nn_ = eager(x, nll_labels)
        return L.orpo_loss(s[:B], s[B:], beta=0.3, chosen_lengths=n[:B], rejected_lengths=n[B:],
                           nll_logps=ns[:B], nll_lengths=nn_[:B])
    theirs = run(ref, logits)
    torch.testing.assert_close(ours[:2], theirs[:2], rtol=1e-10, atol=1e-12)
    default = run(lambda x: L.ORPOLoss(beta=0.3)(x, labels), logits)
    assert default[2]["nll_loss"] != ours[2]["nll_loss"]  # completions only
    bad = nll_labels.clone()
    bad[labels != -100] = (bad[labels != -100] + 1) % V
    with pytest.raises(ValueError, match="nll_labels must equal labels"):
        L.ORPOLoss()(logits, labels, nll_labels=bad)


def test_kto_module_matches_functional():
    logits, labels, _ = batch(6)
    ref_logits = torch.randn_like(logits)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl_p, kl_r = torch.randn(2 * B, dtype=torch.float64), torch.randn(2 * B, dtype=torch.float64)
    crit = L.KTOLoss(beta=0.2, desirable_weight=1.2)
    ours = run(lambda x: crit(x, labels, desirable, ref_logits=ref_logits,
                              policy_kl_logps=kl_p + 1, ref_kl_logps=kl_r), logits)

    def ref(x):
        s, _ = eager(x, labels)
        rs, _ = eager(ref_logits, labels)
        return L.kto_loss(s, rs, desirable, policy_kl_logps=kl_p + 1, ref_kl_logps=kl_r,
                          beta=0.2, desirable_weight=1.2)
    theirs = run(ref, logits)
    torch.testing.assert_close(ours[:2], theirs[:2], rtol=1e-10, atol=1e-12)
    # the KL inputs straight from the module's own no-graph pass
    kl_logps = crit.sequences(labels, ref_logits, policy=False)
    assert not kl_logps.requires_grad


def test_fused_linear_path_of_the_modules():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    _, labels, _ = batch(7)
    for crit in (L.CPOLoss(loss_type="simpo", cpo_alpha=0.5, backend="torch"),
                 L.DPOLoss(reference_free=True, nll_weight=1.0, backend="torch")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = crit(hidden=h, weight=w, labels=labels)
        loss.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss2, _ = crit(h2 @ w2.T, labels)
        loss2.backward()
        torch.testing.assert_close(loss, loss2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((h.grad, w.grad), (h2.grad, w2.grad), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("make", [
    lambda: (L.CPOLoss(loss_type="simpo", cpo_alpha=0.0), {}),
    lambda: (L.KTOLoss(loss_type="apo_zero_unpaired"),
             {"desirable": torch.arange(2 * B) % 2 == 0, "ref_logps": torch.zeros(2 * B)}),
], ids=["simpo", "kto"])
def test_no_softmax_kept_for_backward(make):
    """A SimPO / KTO step from logits keeps O(tokens) for backward, not the (N, T, V) softmax."""
    crit, kw = make()
    n, t, v = 2 * B, 33, 4096
    logits = torch.randn(n, t, v, requires_grad=True)
    labels = torch.randint(0, v, (n, t))
    info = saved_for_backward(lambda x: crit(x, labels, **kw)[0], (logits,), exclude=[logits])
    assert info["saved_bytes_extra"] < logits.numel() * 4 // 8, info


def test_module_construction_errors():
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.CPOLoss(loss_type="dpo")
    with pytest.raises(ValueError, match="beta"):
        L.ORPOLoss(beta=-1)
    with pytest.raises(TypeError, match="loss_type"):
        L.KTOLoss(loss_type=None)
    with pytest.raises(TypeError, match="average_log_prob"):
        L.DPOLoss(average_log_prob=1)
    with pytest.raises(TypeError, match="nll_weight"):
        L.DPOLoss(nll_weight=None)
    with pytest.raises(TypeError, match="shift"):
        L.CPOLoss(shift=2)
    assert fastdpo.CPOLoss is L.CPOLoss and fastdpo.kto_loss is L.kto_loss
