"""Reward-model targets: ensemble probabilities, rejection sampling statistics, on-policy pairs."""

import math

import pytest
import torch

import fastdpo.losses as L


# ---------------------------------------------------------------- preference_probs
def test_single_model_all_reductions_agree():
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(9, generator=g) * 3, torch.randn(9, generator=g) * 3
    for ens in L.preference.ENSEMBLES:
        t = L.preference_probs(c, r, temperature=2.0, ensemble=ens)
        torch.testing.assert_close(t.margins, (c - r) / 2.0)
        torch.testing.assert_close(t.probs, torch.sigmoid((c - r) / 2.0))
        # (B,) and (1, B) are the same thing
        t1 = L.preference_probs(c[None], r[None], temperature=2.0, ensemble=ens)
        torch.testing.assert_close(t1.probs, t.probs)


def test_ensemble_reductions():
    g = torch.Generator().manual_seed(1)
    E, B = 5, 6
    c = torch.randn(E, B, generator=g, dtype=torch.float64) * 2
    r = torch.randn(E, B, generator=g, dtype=torch.float64) * 2
    m = c - r  # (E, B)
    t = L.preference_probs(c, r, ensemble="mean_prob")
    torch.testing.assert_close(t.probs, torch.sigmoid(m).mean(0))
    p = torch.sigmoid(m).mean(0)
    torch.testing.assert_close(t.margins, torch.log(p / (1 - p)))
    t = L.preference_probs(c, r, ensemble="mean_margin")
    torch.testing.assert_close(t.margins, m.mean(0))
    t = L.preference_probs(c, r, ensemble="lower_quantile", quantile=0.0)
    torch.testing.assert_close(t.margins, m.min(0).values)
    t = L.preference_probs(c, r, ensemble="lower_quantile", quantile=0.25)
    srt = m.sort(0).values  # linear interpolation between order statistics: position 0.25*(E-1) = 1
    torch.testing.assert_close(t.margins, srt[1])
    t = L.preference_probs(c, r, ensemble="mean_minus_std", std_coef=1.5)
    sd = ((m - m.mean(0)) ** 2).mean(0).sqrt()
    torch.testing.assert_close(t.margins, m.mean(0) - 1.5 * sd)
    for ens in L.preference.ENSEMBLES:
        t = L.preference_probs(c, r, ensemble=ens)
        torch.testing.assert_close(t.probs, torch.sigmoid(t.margins))
        assert t.probs.dtype == torch.float64
    # the pessimistic reductions sit below the mean where the members disagree
    lo = L.preference_probs(c, r, ensemble="mean_minus_std").margins
    assert torch.all(lo <= m.mean(0) + 1e-12)


def test_mean_prob_margin_finite_when_prob_rounds_to_one():
    c = torch.tensor([[100.0, -100.0], [120.0, -90.0]])
    r = torch.zeros(2, 2)
    t = L.preference_probs(c, r)
    assert t.probs[0] == 1.0 and t.probs[1] == 0.0
    assert torch.isfinite(t.margins).all()
    # log(mean sigmoid) ~ log((1 + 1) / 2) = 0 and log(mean sigmoid(-m)) ~ log(e^-100 / 2)
    assert t.margins[0].item() == pytest.approx(100 + math.log(2), rel=1e-5)
    assert t.margins[1].item() == pytest.approx(-(90 + math.log(2)), rel=1e-5)


def test_targets_feed_soft_and_distill():
    g = torch.Generator().manual_seed(2)
    rc, rr = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t = L.preference_probs(rc, rr, ensemble="mean_margin")
    lp = [torch.randn(4, generator=g) for _ in range(4)]
    L.dpo_loss(*lp, loss_type="soft", target_probs=t.probs)
    L.dpo_loss(*lp, loss_type="distill", reward_margins=t.margins)
    # at the distill optimum D = margin, soft's gradient vanishes too: sigma(D) = s
    beta = 0.5
    pc = (t.margins / beta).double().requires_grad_(True)
    zero = torch.zeros(4, dtype=torch.float64)
    loss, _ = L.dpo_loss(pc, zero, zero, zero, beta=beta, loss_type="soft",
                         target_probs=t.probs.double())
    loss.backward()
    assert pc.grad.abs().max() < 1e-7


# ---------------------------------------------------------------- rejection_sample
def binom_ok(hits, n, p, z=4.5):
    return abs(hits / n - p) <= z * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def test_rejection_sample_acceptance_frequencies():
    rewards = torch.tensor([1.0, 0.2, -0.5, 0.9, -2.0, 1.0])
    beta = 0.7
    P, K = 20000, rewards.numel()
    g = torch.Generator().manual_seed(123)
    out = L.rejection_sample(rewards.expand(P, K), beta, num_samples=K, generator=g)
    accepted = torch.zeros(P, K)
    rows = torch.arange(P)[:, None].expand(P, K)
    ok = out.indices >= 0
    accepted[rows[ok], out.indices[ok]] = 1
    expect = torch.exp((rewards - rewards.max()) / beta)
    for k in range(K):
        hits = accepted[:, k].sum().item()
        assert binom_ok(hits, P, expect[k].item()), (k, hits / P, expect[k])
    torch.testing.assert_close(out.counts, accepted.sum(1).long())


def test_rejection_sample_layout_and_subsampling():
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(500, 8, generator=g)
    rewards[0, 3:] = -math.inf  # prompt 0 has three candidates
    out = L.rejection_sample(rewards, 0.5, num_samples=3, generator=g)
    assert out.indices.shape == (500, 3) and out.indices.dtype == torch.int64
    assert torch.all(out.counts >= 1) and torch.all(out.counts <= 3)  # the best is always accepted
    for p in range(500):
        n = int(out.counts[p])
        idx = out.indices[p]
        assert torch.all(idx[n:] == -1) and torch.all(idx[:n] >= 0)
        assert len(set(idx[:n].tolist())) == n  # without replacement
        assert int(rewards[p].argmax()) in idx[:n].tolist() or n == 3
    assert set(out.indices[0, : int(out.counts[0])].tolist()) <= {0, 1, 2}
    # two tied best candidates, one slot: each taken half the time
    tied = torch.tensor([[2.0, 2.0, -50.0]]).expand(4000, 3)
    out = L.rejection_sample(tied, 1.0, num_samples=1, generator=g)
    assert torch.all(out.counts == 1)
    assert binom_ok((out.indices[:, 0] == 0).sum().item(), 4000, 0.5)


def test_rejection_sample_rounds_fill_up():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(64, 6, generator=g) * 5
    one = L.rejection_sample(rewards, 0.2, num_samples=4, generator=g)
    many = L.rejection_sample(rewards, 0.2, num_samples=4, generator=g, max_rounds=50)
    assert torch.all(many.counts == 4) and torch.all(many.indices >= 0)
    assert one.counts.float().mean() < 4
    none = L.rejection_sample(torch.full((2, 3), -math.inf), 1.0, 2, generator=g)
    assert torch.all(none.counts == 0) and torch.all(none.indices == -1)
    # reproducible with the same generator state
    a = L.rejection_sample(rewards, 1.0, 3, generator=torch.Generator().manual_seed(5))
    b = L.rejection_sample(rewards, 1.0, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.indices, b.indices)


# ---------------------------------------------------------------- build_pairs
def test_build_pairs_best_worst():
    rewards = torch.tensor([[0.1, 2.0, -1.0, 0.5],
                            [1.0, 1.0, 1.0, 1.0],             # all tied: no pair
                            [-math.inf, 3.0, 0.0, -math.inf],  # two real candidates
                            [0.3, 0.2, -math.inf, -math.inf]])  # gap 0.1 <= margin below
    p = L.build_pairs(rewards, temperature=0.5)
    assert p.prompt_index.tolist() == [0, 2, 3]
    assert p.chosen_index.tolist() == [1, 1, 0]
    assert p.rejected_index.tolist() == [2, 2, 1]
    gap = torch.tensor([3.0, 3.0, 0.1])
    torch.testing.assert_close(p.probs, torch.sigmoid(gap / 0.5))
    torch.testing.assert_close(p.margins, gap / 0.5)
    p = L.build_pairs(rewards, margin=0.15)
    assert p.prompt_index.tolist() == [0, 2]


def test_build_pairs_all():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 3.0], [2.0, -math.inf, 0.0, 2.5]])
    p = L.build_pairs(rewards, strategy="all", margin=0.4)
    got = list(zip(p.prompt_index.tolist(), p.chosen_index.tolist(), p.rejected_index.tolist()))
    expect = [(pi, i, j) for pi in range(2) for i in range(4) for j in range(4)
              if math.isfinite(rewards[pi, i]) and math.isfinite(rewards[pi, j])
              and rewards[pi, i] - rewards[pi, j] > 0.4]
    assert got == expect
    gaps = torch.tensor([rewards[a, b] - rewards[a, c] for a, b, c in got])
    torch.testing.assert_close(p.probs, torch.sigmoid(gaps))
    empty = L.build_pairs(torch.zeros(2, 3), strategy="all")
    assert empty.prompt_index.numel() == 0 and empty.probs.numel() == 0


def test_build_pairs_ensemble():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3, 5, 6, generator=g)  # (E, P, K)
    p = L.build_pairs(rewards, ensemble="mean_minus_std")
    mean = rewards.mean(0)
    assert p.chosen_index.tolist() == mean.argmax(1).tolist()
    assert p.rejected_index.tolist() == mean.argmin(1).tolist()
    cr = rewards[:, p.prompt_index, p.chosen_index]
    rr = rewards[:, p.prompt_index, p.rejected_index]
    t = L.preference_probs(cr, rr, ensemble="mean_minus_std")
    torch.testing.assert_close(p.probs, t.probs)
    torch.testing.assert_close(p.margins, t.margins)
