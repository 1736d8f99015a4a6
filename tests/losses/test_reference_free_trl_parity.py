"""cpo_loss, orpo_loss and kto_loss against TRL 1.16's own trainer code on the same inputs.

TRL's CPO and ORPO trainers compute the loss in ``get_batch_loss_metrics`` (log-probs from logits,
the NLL, the pair loss); KTO's lives in ``KTOTrainer._compute_loss``. We run those unbound methods
on a ``SimpleNamespace``-like stand-in for the trainer (only what they read) and a stand-in model
returning given fp64 logits or per-token log-probs, so TRL's code computes loss, gradients and
metrics; ours gets the same numbers as sequence log-probs. Nothing is downloaded.
"""

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastdpo.losses as L

import peers

peers.require("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer, log1mexp  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

B, T, V = 3, 7, 11
CPU = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                      gather=lambda x: x)


def paired_batch(seed=0):
    """Token ids, attention masks and labels (prompt and padding = -100) of B pairs, logits."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, V, (B, T), generator=g)
        plen = torch.randint(1, 3, (B,), generator=g)  # prompt tokens
        end = torch.randint(4, T + 1, (B,), generator=g)  # then completion up to `end`
        pos = torch.arange(T)
        att = (pos < end[:, None]).long()
        labels = ids.masked_fill((pos < plen[:, None]) | (att == 0), -100)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att,
                      f"{side}_labels": labels})
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64) * 3
    return batch, logits


def stand_in(cls, **attrs):
    """An object with ``cls``'s loss methods and the attributes they read."""
    ns = type("Trainer", (), {k: cls.__dict__[k] for k in (
        "concatenated_inputs", "concatenated_forward", "get_batch_logps", "get_batch_loss_metrics",
        "cpo_loss", "odds_ratio_loss") if k in cls.__dict__})()
    ns.__dict__.update(accelerator=CPU, is_encoder_decoder=False, pad_token_id=0, padding_value=0,
                       aux_loss_enabled=False, **attrs)
    return ns


def run_trl(tr, batch, logits):
    """TRL's ``get_batch_loss_metrics`` with a stand-in model returning ``logits``: the loss, the
    metrics and d loss / d logits."""
    x = logits.clone().requires_grad_(True)
    loss, metrics = tr.get_batch_loss_metrics(lambda *a, **k: SimpleNamespace(logits=x), batch)
    loss.backward()
    return loss.detach(), metrics, x.grad


def pair_labels(batch):
    return torch.cat([batch["chosen_labels"], batch["rejected_labels"]])


def seq_logps(logits, labels):
    """Summed log-probs of the shifted non-ignored labels, and their count (fp64, plain torch)."""
    lab = labels[:, 1:]
    mask = lab != -100
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("loss_type,alpha,ls,cpo_alpha", [
    ("sigmoid", 0.0, 0.0, 1.0), ("sigmoid", 0.0, 0.2, 0.5), ("hinge", 0.0, 0.0, 1.0),
    ("ipo", 0.0, 0.0, 1.0), ("simpo", 0.0, 0.1, 0.0), ("simpo", 0.25, 0.0, 0.0),
    ("simpo", -0.3, 0.0, 1.0), ("sigmoid", 0.01, 0.0, 1.0)])
def test_cpo_matches_trl_trainer_from_logits(loss_type, alpha, ls, cpo_alpha):
    batch, logits = paired_batch()
    beta, gamma = 0.7, 0.6
    tr = stand_in(CPOTrainer, beta=beta, label_smoothing=ls, loss_type=loss_type,
                  cpo_alpha=cpo_alpha, simpo_gamma=gamma, alpha=alpha)
    loss_t, metrics_t, grad_t = run_trl(tr, batch, logits)
    ours_logits = logits.clone().requires_grad_(True)
    s, n = seq_logps(ours_logits, pair_labels(batch))
    loss, metrics = L.cpo_loss(s[:B], s[B:], beta=beta, loss_type=loss_type, simpo_gamma=gamma,
                               alpha=alpha, label_smoothing=ls, cpo_alpha=cpo_alpha,
                               chosen_lengths=n[:B], rejected_lengths=n[B:])
    loss.backward()
    torch.testing.assert_close(loss, loss_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logits.grad, grad_t, rtol=1e-10, atol=1e-12)
    for k, v in metrics.items():
        rel = 1e-7 if k == "rewards/accuracies" else 1e-10  # TRL's is .float()
        assert metrics_t[k] == pytest.approx(v.item(), rel=rel, abs=1e-12), k


@pytest.mark.parametrize("loss_type", L.CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_cpo_per_pair_matches_trl_cpo_loss(loss_type, alpha):
    """reduction='none': each pair's loss and gradient is TRL's ``cpo_loss`` of that pair."""
    g = torch.Generator().manual_seed(3)
    pc = -torch.rand(8, generator=g, dtype=torch.float64) * 3
    pr = -torch.rand(8, generator=g, dtype=torch.float64) * 3
    ls = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    tr = stand_in(CPOTrainer, beta=0.3, label_smoothing=ls, loss_type=loss_type, simpo_gamma=0.4,
                  alpha=alpha)
    up = torch.rand(8, generator=g, dtype=torch.float64)  # an upstream gradient per pair
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    per_t, rc_t, rr_t = tr.cpo_loss(x, y)
    (per_t * up).sum().backward()
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    per, m = L.cpo_loss(a, b, beta=0.3, loss_type=loss_type, simpo_gamma=0.4, alpha=alpha,
                        label_smoothing=ls, cpo_alpha=0.0, reduction="none")
    (per * up).sum().backward()
    torch.testing.assert_close(per, per_t.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((a.grad, b.grad), (x.grad, y.grad), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((m["rewards/chosen"], m["rewards/rejected"]), (rc_t, rr_t))


def orpo_nll_inputs(batch, logits):
    """ORPO's NLL covers prompt and completion of the chosen sequences (attention mask)."""
    ids, att = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    return seq_logps(logits[:B], ids.masked_fill(att == 0, -100))


def test_orpo_matches_trl_trainer_from_logits():
    batch, logits = paired_batch(seed=1)
    beta = 0.4
    loss_t, metrics_t, grad_t = run_trl(stand_in(ORPOTrainer, beta=beta), batch, logits)
    ours_logits = logits.clone().requires_grad_(True)
    s, n = seq_logps(ours_logits, pair_labels(batch))
    nll_s, nll_n = orpo_nll_inputs(batch, ours_logits)
    loss, metrics = L.orpo_loss(s[:B], s[B:], beta=beta, chosen_lengths=n[:B],
                                rejected_lengths=n[B:], nll_logps=nll_s, nll_lengths=nll_n)
    loss.backward()
    # TRL's odds_ratio_loss casts to fp32 (``.float()``): agreement to fp32 precision
    torch.testing.assert_close(loss, loss_t, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_logits.grad, grad_t, rtol=1e-5, atol=1e-8)
    for k, v in metrics.items():
        assert metrics_t[k] == pytest.approx(v.item(), rel=1e-6, abs=1e-7), k


def trl_orpo64(pc, pr, beta):
    """TRL's odds_ratio_loss formula in fp64 (its own ``log1mexp``), for the per-pair check."""
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    return -beta * F.logsigmoid(log_odds)


def test_orpo_per_pair_matches_trl_formula_in_fp64():
    g = torch.Generator().manual_seed(5)
    pc = -torch.rand(8, generator=g, dtype=torch.float64) * 2
    pr = -torch.rand(8, generator=g, dtype=torch.float64) * 2
    pc[0], pr[1] = -1e-6, -1e-7  # near-certain completions: log1mexp's small branch
    up = torch.rand(8, generator=g, dtype=torch.float64)
    x, y = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    per_t = trl_orpo64(x, y, 0.2)
    (per_t * up).sum().backward()
    a, b = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    per, _ = L.orpo_loss(a, b, beta=0.2, nll_weight=0.0, reduction="none")
    (per * up).sum().backward()
    torch.testing.assert_close(per, per_t.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close((a.grad, b.grad), (x.grad, y.grad), rtol=1e-9, atol=1e-12)


def trl_kto(policy_tok, ref_logps, kl_tok, ref_kl_logps, labels, *, loss_type, beta, wd, wu):
    """TRL's KTOTrainer._compute_loss with precomputed reference log-probs; the stand-in model
    returns the given per-token log-probs (main batch, or the KL batch)."""
    n, t = policy_tok.shape
    main_ids, kl_ids = torch.zeros(n, t + 1, dtype=torch.long), torch.ones(n, t + 1,
                                                                           dtype=torch.long)

    def model(input_ids, **kw):
        lp = policy_tok if input_ids is main_ids else kl_tok
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                               mean_logits=torch.zeros_like(lp))

    calc_kl = loss_type == "kto"
    tr = SimpleNamespace(accelerator=CPU, model=SimpleNamespace(training=True), beta=beta,
                         loss_type=loss_type, desirable_weight=wd, undesirable_weight=wu,
                         calculate_KL=calc_kl, precompute_ref_logps=True, aux_loss_enabled=False,
                         _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                         _tp_size=1)
    tr._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(tr, m, b)
    ones = torch.ones(n, t + 1, dtype=torch.long)
    batch = {"input_ids": main_ids, "attention_mask": ones, "completion_mask": ones,
             "label": labels, "ref_logps": ref_logps}
    if calc_kl:
        batch.update(KL_input_ids=kl_ids, KL_attention_mask=ones, KL_completion_mask=ones,
                     ref_KL_logps=ref_kl_logps)
    loss = KTOTrainer._compute_loss(tr, model, batch, False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", L.KTO_LOSS_TYPES)
@pytest.mark.parametrize("kl_shift", [3.0, -3.0])  # KL estimate positive, or clamped to 0
def test_kto_matches_trl_trainer(loss_type, kl_shift):
    g = torch.Generator().manual_seed(7)
    n, t = 6, 4
    policy_tok = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    kl_tok = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    ref = policy_tok.sum(-1) + torch.randn(n, generator=g, dtype=torch.float64)
    ref_kl = kl_tok.sum(-1) - kl_shift + torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    labels = torch.tensor([True, False, True, True, False, False])
    kw = dict(loss_type=loss_type, beta=0.4, wd=1.3, wu=0.8)
    x = policy_tok.clone().requires_grad_()
    loss_t, metrics_t = trl_kto(x, ref, kl_tok, ref_kl, labels, **kw)
    loss_t.backward()
    p = policy_tok.sum(-1).clone().requires_grad_()
    kl_kw = dict(policy_kl_logps=kl_tok.sum(-1), ref_kl_logps=ref_kl) if loss_type == "kto" \
        else {}
    loss, metrics = L.kto_loss(p, ref, labels, beta=0.4, desirable_weight=1.3,
                               undesirable_weight=0.8, loss_type=loss_type, **kl_kw)
    loss.backward()
    torch.testing.assert_close(loss, loss_t.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.grad, x.grad[:, 0], rtol=1e-12, atol=1e-14)
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
             "logps/rejected"] + (["kl"] if loss_type == "kto" else [])
    for k in names:
        assert metrics_t[k] == pytest.approx(metrics[k].item(), rel=1e-12, abs=1e-14), k
    if loss_type == "kto" and kl_shift < 0:
        assert metrics["kl"].item() == 0.0  # the clamp

    # reduction="none": per example in input order; TRL concatenates desirable then undesirable
    per, _ = L.kto_loss(p.detach(), ref, labels, beta=0.4, desirable_weight=1.3,
                        undesirable_weight=0.8, loss_type=loss_type, reduction="none", **kl_kw)
    order = torch.cat([labels.nonzero()[:, 0], (~labels).nonzero()[:, 0]])
    assert per.shape == (n,)
    torch.testing.assert_close(per[order].mean(), loss_t.detach(), rtol=1e-12, atol=1e-14)


def test_kto_kl_is_not_differentiated():
    pol = torch.randn(4, dtype=torch.float64, requires_grad=True)
    kl_p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss, m = L.kto_loss(pol, torch.zeros(4, dtype=torch.float64),
                         torch.tensor([True, False, True, False]), policy_kl_logps=kl_p + 5,
                         ref_kl_logps=torch.zeros(4, dtype=torch.float64))
    loss.backward()
    assert kl_p.grad is None and pol.grad is not None
    assert m["kl"].item() == pytest.approx((kl_p + 5).mean().item())


@pytest.mark.parametrize("which", ["cpo-simpo", "orpo"])
def test_loss_modules_match_trl_trainers_from_logits(which):
    """CPOLoss / ORPOLoss straight from the logits (fastdpo's log-prob kernels) against TRL."""
    batch, logits = paired_batch(seed=2)
    logits = logits.float().double()  # values exact in fp32 too
    if which == "orpo":
        tr = stand_in(ORPOTrainer, beta=0.3)
    else:
        tr = stand_in(CPOTrainer, beta=0.3, label_smoothing=0.0, loss_type="simpo",
                      cpo_alpha=0.5, simpo_gamma=0.5, alpha=0.0)
    loss_t, _, grad_t = run_trl(tr, batch, logits)
    ours = logits.clone().requires_grad_(True)
    labels = pair_labels(batch)
    if which == "orpo":
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        loss, _ = L.ORPOLoss(beta=0.3, backend="torch")(
            ours, labels, nll_labels=ids.masked_fill(att == 0, -100))
        tol = dict(rtol=1e-5, atol=1e-8)  # TRL's odds ratio runs in fp32
    else:
        loss, _ = L.CPOLoss(beta=0.3, loss_type="simpo", cpo_alpha=0.5, backend="torch")(
            ours, labels)
        tol = dict(rtol=1e-10, atol=1e-12)
    loss.backward()
    torch.testing.assert_close(loss, loss_t, **tol)
    torch.testing.assert_close(ours.grad, grad_t, **tol)
