"""Precision of the Triton log-prob kernels at any logit offset and temperature.

The kernels subtract the row max from the raw logits before scaling by 1 / temperature, as eager
log_softmax does (and halve both first, so logits of opposite signs near the fp32 limit do not
overflow): these inputs break kernels that form ``x / T - lse``. Run under TRITON_INTERPRET=1
without a GPU.
"""

import math

import pytest
import torch

from logps_helpers import BLOCK, INF, lse_of, make, ref_fwd, ref_grad, run_bwd, run_fwd
from tolerance import assert_rule



def tight_rule(out, x, lab, temperature, what, g=None, ge=None, slack=2e-7):
    """``assert_rule`` with an absolute slack of ``slack (1 + |ref|)`` instead of the dtype's
    default: eager fp32 is good to ~1e-7 here, and so must the kernels be."""
    if g is None:
        lp64, ent64, _ = ref_fwd(x, lab, temperature)
        lp32, ent32, _ = ref_fwd(x, lab, temperature, dtype=torch.float32)
        ref64, eager = {"logp": (lp64, lp32), "entropy": (ent64, ent32)}[what]
    else:
        ref64 = ref_grad(x, lab, g, ge, temperature)
        eager = ref_grad(x, lab, g, ge, temperature, dtype=torch.float32)
    assert_rule(out, ref64, eager, torch.float32, atol=slack, what=what)


@pytest.mark.parametrize("offset", [1000.0, -1000.0, 3e4])
def test_large_offset_keeps_eager_precision(K, device, offset):
    x, lab = make(2, 3, 2 * BLOCK + 9, torch.float32, device, seed=20, ignore_frac=0.0)
    x = x + offset
    lp, rm, ls, ent = run_fwd(K, x, lab)
    tight_rule(lp, x, lab, 1.0, "logp")
    tight_rule(ent, x, lab, 1.0, "entropy")
    gen = torch.Generator().manual_seed(21)
    g, ge = torch.randn(2, 3, generator=gen).to(device), torch.randn(2, 3, generator=gen).to(device)
    out = run_bwd(K, g, ge, x, lab, (rm, ls), ent, torch.empty_like(x))
    tight_rule(out, x, lab, 1.0, "grad", g, ge)


def test_constant_row_of_1e8(K, device):
    V = 3 * BLOCK + 1
    x = torch.full((1, 2, V), 1e8, device=device)
    lab = torch.tensor([[0, V - 1]], device=device)
    lp, rm, ls, ent = run_fwd(K, x, lab)
    torch.testing.assert_close(lp.cpu().double(), torch.full((1, 2), -math.log(V),
                                                             dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(ent.cpu().double(), torch.full((1, 2), math.log(V),
                                                              dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert torch.equal(rm.cpu(), torch.full((1, 2), 1e8))
    g, ge = torch.ones(1, 2, device=device), torch.full((1, 2), 0.5, device=device)
    out = run_bwd(K, g, ge, x, lab, (rm, ls), ent, torch.empty_like(x)).cpu().double()
    want = torch.full((V,), -1.0 / V, dtype=torch.float64)  # uniform p; dH/dx = 0 here
    for t, col in ((0, 0), (1, V - 1)):
        w = want.clone()
        w[col] += 1.0
        torch.testing.assert_close(out[0, t], w, rtol=0, atol=1e-7)
        assert abs(out[0, t].sum().item()) < 1e-6


@pytest.mark.parametrize("temperature", [0.01, 0.05])
def test_low_temperature_at_eager_precision(K, device, temperature):
    x, lab = make(2, 3, 2 * BLOCK + 9, torch.float32, device, seed=22, ignore_frac=0.0)
    x = x * 0.05  # a softmax that is neither one-hot nor flat at this temperature
    lp, rm, ls, ent = run_fwd(K, x, lab, temperature=temperature)
    tight_rule(lp, x, lab, temperature, "logp", slack=1e-6)
    tight_rule(ent, x, lab, temperature, "entropy", slack=1e-6)
    gen = torch.Generator().manual_seed(23)
    g, ge = torch.randn(2, 3, generator=gen).to(device), torch.randn(2, 3, generator=gen).to(device)
    out = run_bwd(K, g, ge, x, lab, (rm, ls), ent, torch.empty_like(x), temperature=temperature)
    tight_rule(out, x, lab, temperature, "grad", g, ge)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_near_fp32_limit_stay_finite(K, device, temperature):
    """Logits of +-3e38 (x / T still finite): eager is finite, so must the kernels be."""
    V = 2 * BLOCK + 3
    x, _ = make(1, 4, V, torch.float32, device, seed=24)
    x = x.cpu()
    x[0, 0, 7], x[0, 0, 90] = 3e38, -3e38
    x[0, 1, :] = -3e38
    x[0, 1, 100] = 3e38
    x[0, 2, :] = 3e38
    x[0, 3, 5], x[0, 3, 6] = 3e38, 2e38
    lab = torch.tensor([[7, 90, 3, 6]])
    x, lab = x.to(device), lab.to(device)
    lp32, ent32, _ = ref_fwd(x, lab, temperature, dtype=torch.float32)
    assert torch.isfinite(lp32[:, [0, 2, 3]]).all()  # eager
    lp, rm, ls, ent = run_fwd(K, x, lab, temperature=temperature)
    lp64, ent64, _ = ref_fwd(x, lab, temperature)
    fin = torch.isfinite(lp32)  # -6e38 / T may be below the fp32 range: -inf, as eager
    assert_rule(lp[fin], lp64[fin], lp32[fin], torch.float32, what="logp")
    assert torch.equal(lp[~fin].cpu(), lp32[~fin])
    assert_rule(ent, ent64, ent32, torch.float32, what="entropy")
    g, ge = torch.ones(1, 4, device=device), torch.full((1, 4), 0.5, device=device)
    g[0, 1] = 0.0  # the label at -3e38 has log-prob -inf: its gradient is not finite anywhere
    out = run_bwd(K, g, ge, x, lab, (rm, ls), ent, torch.empty_like(x), temperature=temperature)
    assert torch.isfinite(out).all()
    # eager fp32 autograd gives NaN in places here: held to float64 alone
    ref = ref_grad(x, lab, g, ge, temperature)
    assert_rule(out, ref, ref, torch.float32, what="grad")


def test_all_masked_row_statistics(K, device):
    x, lab = make(1, 3, BLOCK + 5, torch.float32, device, seed=25, ignore_frac=0.0)
    x[0, 0] = -INF
    x[0, 2, : BLOCK] = -INF  # a whole tile masked, the tail alive
    lp, rm, ls, ent = run_fwd(K, x, lab)
    assert rm[0, 0].item() == -INF and ls[0, 0].item() == -INF
    assert lse_of(rm, ls)[0, 0].item() == -INF
    assert torch.isfinite(rm[0, 1:]).all() and torch.isfinite(ls[0, 1:]).all()
    lab2 = lab.clone()
    lab2[0, 2] = BLOCK + 2
    lp, rm, ls, ent = run_fwd(K, x, lab2)
    lp64, ent64, _ = ref_fwd(x, lab2)
    assert_rule(lp[:, 1:], lp64[:, 1:], lp64[:, 1:], torch.float32, what="logp")
    assert_rule(ent[:, 1:], ent64[:, 1:], ent64[:, 1:], torch.float32, what="entropy")
