"""DPOLoss end to end on a tiny random-init causal LM, against an eager plain-torch DPO."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import fastdpo
import fastdpo.losses as L

V, B, T = 128, 3, 11  # B pairs -> 2B sequences


def tiny_llama(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    labels = ids.clone()
    prompt = torch.randint(2, 5, (2 * B,), generator=g)
    end = torch.randint(6, T + 1, (2 * B,), generator=g)
    pos = torch.arange(T)
    labels[(pos < prompt[:, None]) | (pos >= end[:, None])] = -100  # prompt and padding
    return ids, labels


def eager_logps(logits, labels):
    """log_softmax + gather with the causal shift, summed over completion tokens."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    lab = labels[:, 1:]
    mask = lab != -100
    tok = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(-1), mask.sum(-1)


def eager_loss(kind, pc, pr, rc, rr, nc, nr, beta, s=None, m=None):
    """TRL's per-pair formulas in plain torch (autograd differentiates them)."""
    c, r = pc - rc, pr - rr
    if kind == "sigmoid":
        per = -F.logsigmoid(beta * (c - r))
    elif kind == "ipo":
        per = (c / nc.clamp(min=1) - r / nr.clamp(min=1) - 1 / (2 * beta)) ** 2
    elif kind == "soft":
        x = beta * (c - r)
        per = -s * F.logsigmoid(x) - (1 - s) * F.logsigmoid(-x)
    elif kind == "distill":
        per = (beta * (c - r) - m) ** 2
    elif kind == "apo_down":
        per = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
    elif kind == "sft":
        per = (-pc.sum() / nc.sum()).expand(pc.shape)
    return per.mean()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def eager_grads(policy, ref, ids, labels, kind, beta, **targets):
    policy.zero_grad()
    logps, n = eager_logps(policy(ids).logits, labels)
    with torch.no_grad():
        ref_logps, _ = eager_logps(ref(ids).logits, labels)
    pc, pr = logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    nc, nr = n.chunk(2)
    loss = eager_loss(kind, pc, pr, rc, rr, nc.float(), nr.float(), beta, **targets)
    loss.backward()
    return loss.detach(), grads(policy)


def assert_grads_close(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


TARGETS = {"soft": dict(s=torch.tensor([1.0, 0.3, 0.8])),
           "distill": dict(m=torch.tensor([0.5, -1.0, 2.0]))}


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "soft", "distill", "apo_down", "sft"])
def test_model_gradients_match_eager(models, kind):
    policy, ref = models
    ids, labels = batch(1)
    beta = 0.5
    t = TARGETS.get(kind, {})
    e_loss, e_grads = eager_grads(policy, ref, ids, labels, kind, beta, **t)
    policy.zero_grad()
    crit = L.DPOLoss(beta=beta, loss_type=kind, backend="torch")
    with torch.no_grad():
        ref_logits = ref(ids).logits
    loss, metrics = crit(policy(ids).logits, labels, ref_logits=ref_logits,
                         target_probs=t.get("s"), reward_margins=t.get("m"))
    loss.backward()
    torch.testing.assert_close(loss, e_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(policy), e_grads)
    assert set(metrics) == set(L.dpo.METRIC_NAMES)


def test_backends_and_inplace_backward(models, backend, device):
    policy, ref = (copy.deepcopy(m).to(device) for m in models)
    ids, labels = (t.to(device) for t in batch(2))
    e_loss, e_grads = eager_grads(policy, ref, ids, labels, "sigmoid", 0.1)
    with torch.no_grad():
        ref_logits = ref(ids).logits
    for inplace in (False, True):
        policy.zero_grad()
        crit = L.DPOLoss(beta=0.1, backend=backend, inplace_backward=inplace)
        logits = policy(ids).logits
        loss, _ = crit(logits, labels, ref_logits=ref_logits)
        loss.backward()
        torch.testing.assert_close(loss, e_loss, rtol=1e-5, atol=1e-6)
        assert_grads_close(grads(policy), e_grads)


def test_fused_linear_path(models):
    policy, ref = models
    ids, labels = batch(3)
    beta = 0.2
    e_loss, e_grads = eager_grads(policy, ref, ids, labels, "ipo", beta)
    policy.zero_grad()
    crit = L.DPOLoss(beta=beta, loss_type="ipo", backend="torch")
    hidden = policy.model(ids).last_hidden_state
    with torch.no_grad():
        ref_hidden = ref.model(ids).last_hidden_state
    loss, _ = crit(hidden=hidden, weight=policy.lm_head.weight, labels=labels,
                   ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight)
    loss.backward()
    torch.testing.assert_close(loss, e_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(policy), e_grads)
    assert all(p.grad is None for p in ref.parameters())


def test_reference_inputs_agree():
    """ref_logits, ref_logps as a pair and as one (2B,) tensor give the same loss."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2 * B, T, V, generator=g)
    ref_logits = torch.randn(2 * B, T, V, generator=g)
    _, labels = batch(5)
    crit = L.DPOLoss(beta=0.3, loss_type="sigmoid_norm")
    a, ma = crit(logits, labels, ref_logits=ref_logits)
    ref = fastdpo.sequence_logps(ref_logits, labels, shift=True)
    b, _ = crit(logits, labels, ref_logps=ref.chunk(2))
    c, _ = crit(logits, labels, ref_logps=ref)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert ma["rewards/accuracies"].shape == ()


def test_packed_batch_matches_padded():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    _, labels = batch(6)
    lens = torch.randint(6, T + 1, (2 * B,), generator=g)
    labels[torch.arange(T) >= lens[:, None]] = -100
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()])
    pack = lambda x: torch.cat([x[i, : lens[i]] for i in range(2 * B)])[None]  # noqa: E731
    for kind in ("ipo", "sigmoid"):
        crit = L.DPOLoss(beta=0.4, loss_type=kind)
        x = logits.clone().requires_grad_(True)
        xp = pack(logits).requires_grad_(True)
        a, _ = crit(x, labels, ref_logits=ref_logits)
        b, _ = crit(xp, pack(labels), ref_logits=pack(ref_logits), cu_seqlens=cu)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        a.backward()
        b.backward()
        torch.testing.assert_close(pack(x.grad), xp.grad, rtol=1e-12, atol=1e-12)


def test_bco_running_mean_state():
    g = torch.Generator().manual_seed(7)
    _, labels = batch(7)
    crit = L.DPOLoss(beta=0.5, loss_type="bco_pair", bco_running_mean=True)
    assert "bco_mean" in crit.state_dict()
    means = []
    for _ in range(3):
        logits = torch.randn(2 * B, T, V, generator=g)
        ref = torch.randn(2 * B, T, V, generator=g)
        loss, m = crit(logits, labels, ref_logits=ref)
        means.append(((m["rewards/chosen"] + m["rewards/rejected"]) / 2).item())
    assert crit.bco_count.item() == 3
    assert crit.bco_mean.item() == pytest.approx(sum(means) / 3, rel=1e-5)
    crit.eval()
    before = crit.bco_mean.clone()
    crit(logits, labels, ref_logits=ref)
    assert torch.equal(crit.bco_mean, before) and crit.bco_count.item() == 3


def test_module_argument_errors():
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.DPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        L.DPOLoss(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.DPOLoss(loss_type="robust", label_smoothing=0.6)
    with pytest.raises(ValueError, match="bco_running_mean"):
        L.DPOLoss(loss_type="sigmoid", bco_running_mean=True)
    crit = L.DPOLoss()
    logits = torch.randn(4, 5, V)
    labels = torch.randint(0, V, (4, 5))
    with pytest.raises(ValueError, match="exactly one of ref_logps"):
        crit(logits, labels)
    with pytest.raises(ValueError, match="exactly one of ref_logps"):
        crit(logits, labels, ref_logps=torch.zeros(4), ref_logits=logits)
    with pytest.raises(ValueError, match="either logits or hidden"):
        crit(labels=labels, ref_logps=torch.zeros(4))
    with pytest.raises(ValueError, match="2B sequences"):
        crit(logits[:3], labels[:3], ref_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="hidden needs weight"):
        crit(hidden=torch.randn(4, 5, 8), labels=labels, ref_logps=torch.zeros(4))
    with pytest.raises(ValueError, match="needs target_probs"):
        L.DPOLoss(loss_type="soft")(logits, labels, ref_logps=torch.zeros(4))
