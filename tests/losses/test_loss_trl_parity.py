"""Parity with TRL 1.16's own DPOTrainer loss code on the same inputs.

TRL 1.16 has no standalone ``dpo_loss`` method: the loss branches live in
``DPOTrainer._compute_loss``. We call that unbound method with a ``SimpleNamespace`` standing in
for the trainer (only the attributes it reads) and a stand-in model that returns given per-token
log-probs, so TRL's own code computes loss, gradients and logged metrics. Nothing is downloaded.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import fastdpo.losses as L
import peers

peers.require("trl")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

B = 6


def trl_compute(pc, pr, rc, rr, lengths_c, lengths_r, *, loss_type, beta, label_smoothing=0.0,
                discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha=0.5,
                loss_weights=None):
    """TRL's loss, d loss / d (policy chosen, policy rejected) and metrics."""
    dt = pc.dtype
    lengths = torch.cat([lengths_c, lengths_r])
    T = int(lengths.max()) + 2
    pos = torch.arange(T)
    # token 0 is the prompt, then `length` completion tokens, then padding
    completion_mask = ((pos >= 1) & (pos <= lengths[:, None])).long()
    first = torch.zeros(2 * B, T - 1, dtype=dt)
    first[:, 0] = 1.0  # shifted position 0 scores the first completion token
    per_token = (first * torch.cat([pc, pr])[:, None]).requires_grad_(True)
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, T - 1, dtype=dt),
                          mean_logits=torch.zeros(2 * B, T - 1, dtype=dt),
                          is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                    gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha,
        loss_types=list(loss_type) if not isinstance(loss_type, str) else [loss_type],
        loss_weights=loss_weights or [1.0] * (1 if isinstance(loss_type, str) else len(loss_type)),
        beta=beta, label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc,
              "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, False)
    loss.backward()
    g = per_token.grad[:, 0]
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), g[:B], g[B:], metrics


def make(dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = ((torch.randn(B, generator=g, dtype=torch.float64) * scale - 20).to(dtype)
                      for _ in range(4))
    lc = torch.randint(1, 9, (B,), generator=g)
    lr = torch.randint(1, 9, (B,), generator=g)
    return pc, pr, rc, rr, lc, lr


def ours(pc, pr, rc, rr, lc, lr, **kw):
    x, y = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    loss, metrics = L.dpo_loss(x, y, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, metrics


CASES = [dict(loss_type=t) for t in L.TRL_LOSS_TYPES if t not in ("robust", "exo_pair")] + [
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="aot", label_smoothing=0.2),
    dict(loss_type="aot_unpaired", label_smoothing=0.3),
    dict(loss_type="discopop", discopop_tau=0.5),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="ipo", f_divergence_type="js_divergence"),
    dict(loss_type="robust", label_smoothing=0.2, f_divergence_type="alpha_divergence",
         f_alpha=0.3),
    dict(loss_type="sigmoid_norm", f_divergence_type="alpha_divergence", f_alpha=1.5),
]


def _ids(c):
    return "-".join(str(v) if not isinstance(v, list) else "+".join(map(str, v))
                    for v in c.values())


# TRL's alpha_divergence has no float64 clamp bound (KeyError), so that pair is left out.
PARAMS = [pytest.param(c, dt, id=f"{_ids(c)}-{str(dt)[6:]}") for c in CASES
          for dt in (torch.float64, torch.float32)
          if not (dt == torch.float64 and c.get("f_divergence_type") == "alpha_divergence")]


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_matches_trl(case, dtype):
    # small log-ratio gaps so every loss (apo, discopop's exp) sits in its informative range
    pc, pr, rc, rr, lc, lr = make(dtype, seed=len(_ids(case)), scale=0.5)
    pc, pr = pc + torch.linspace(-3, 3, B, dtype=dtype), pr + torch.linspace(2, -2, B, dtype=dtype)
    beta = 0.5
    trl_kw = dict(case)
    our_kw = dict(case)
    if "f_alpha" in our_kw:
        our_kw["f_alpha_divergence_coef"] = our_kw.pop("f_alpha")
    t_loss, t_gc, t_gr, t_metrics = trl_compute(pc, pr, rc, rr, lc, lr, beta=beta, **trl_kw)
    o_loss, o_gc, o_gr, o_metrics = ours(pc, pr, rc, rr, lc, lr, beta=beta, **our_kw)
    # TRL makes exo_pair's log(1 - eps) a 0-dim fp32 tensor, so its fp64 results carry fp32 error
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    if dtype == torch.float64 and case["loss_type"] == "exo_pair":
        tol = dict(rtol=1e-6, atol=1e-8)
    assert o_loss.dtype == dtype
    torch.testing.assert_close(o_loss, t_loss.to(dtype), **tol)
    torch.testing.assert_close(o_gc, t_gc, **tol)
    torch.testing.assert_close(o_gr, t_gr, **tol)
    for name in L.dpo.METRIC_NAMES:
        assert o_metrics[name].item() == pytest.approx(t_metrics[name], rel=1e-6, abs=1e-7), name


def test_all_trl_loss_types_covered():
    # every loss type TRL 1.16 names in its error message is one of ours
    import inspect
    src = inspect.getsource(DPOTrainer._compute_loss)
    for t in L.TRL_LOSS_TYPES:
        assert f'loss_type == "{t}"' in src
    assert src.count('elif loss_type == "') + 1 == len(L.TRL_LOSS_TYPES)
