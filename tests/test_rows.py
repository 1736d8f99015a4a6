"""The shared row math (fastdpo.rows) against float64 formulas: combining parts of a row's
vocabulary exactly, at any offset, with dead (all -inf) parts, and without overflow."""

import math

import torch

from fastdpo import rows


def _parts(x, label, cuts, temperature):
    """Each part's (logp, row_max, log_sum, entropy) as the row op reports it, and holder flags."""
    out, holder = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        xs = x[..., a:b].double()
        m, s, d, ent = rows.row_stats(xs, temperature, True)
        local = (label >= a) & (label < b)
        idx = torch.where(local, label - a, 0)
        lp = torch.where(local, d.gather(-1, idx[..., None])[..., 0] - s,
                         -rows.lse(m, s, temperature))
        out.append((lp, m, s, ent))
        holder.append(local)
    stack = [torch.stack(t) for t in zip(*out)]
    return stack, torch.stack(holder)


def test_combine_equals_the_whole_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g, dtype=torch.float64) * 4 + 1e6
    label = torch.randint(0, 50, (6,), generator=g)
    for T in (1.0, 0.3, 2.5):
        (lp, m, s, ent), holder = _parts(x, label, [0, 7, 31, 50], T)
        active = torch.ones(6, dtype=torch.bool)
        glp, gm, gs, gent = rows.combine(lp, m, s, ent, holder, active, T)
        z = (x - x.amax(-1, keepdim=True)) / T
        ls = torch.log_softmax(z, -1)
        torch.testing.assert_close(glp, ls.gather(-1, label[:, None])[:, 0])
        torch.testing.assert_close(rows.lse(gm, gs, T), torch.logsumexp(x / T, -1))
        torch.testing.assert_close(gent, -(ls.exp() * ls).sum(-1))


def test_dead_part_holding_the_label_gives_minus_inf():
    x = torch.tensor([[1.0, 2.0, -math.inf, -math.inf]], dtype=torch.float64)
    (lp, m, s, ent), holder = _parts(x, torch.tensor([3]), [0, 2, 4], 1.0)
    glp, gm, gs, _ = rows.combine(lp, m, s, ent, holder, torch.tensor([True]))
    assert glp.item() == -math.inf
    assert torch.isclose(rows.lse(gm, gs), torch.logsumexp(x, -1)).all()
    # every part dead: no distribution at all, NaN as log_softmax gives
    x = torch.full((1, 4), -math.inf, dtype=torch.float64)
    (lp, m, s, ent), holder = _parts(x, torch.tensor([1]), [0, 2, 4], 1.0)
    glp, gm, gs, gent = rows.combine(lp, m, s, ent, holder, torch.tensor([True]))
    assert math.isnan(glp.item()) and gm.item() == -math.inf and gs.item() == -math.inf


def test_ignored_rows_are_zero_and_invalid_labels_nan():
    x = torch.randn(2, 8, dtype=torch.float64)
    (lp, m, s, ent), holder = _parts(x, torch.tensor([1, 5]), [0, 4, 8], 1.0)
    lp[:, 1] = float("nan")  # an invalid label is NaN on every part
    out = rows.combine(lp, m, s, ent, holder, torch.tensor([False, True]))
    assert all(t[0].item() == 0.0 for t in out)
    assert math.isnan(out[0][1].item())


def test_scaled_diff_does_not_overflow():
    x = torch.tensor([-3.0e38], dtype=torch.float32)
    ref = torch.tensor([3.0e38], dtype=torch.float32)
    assert rows.scaled_diff(x, ref, 4.0).item() == torch.tensor(-1.5e38).item()
    assert rows.scaled_diff(x, ref, 1.0).item() == -math.inf  # the exact value overflows too
