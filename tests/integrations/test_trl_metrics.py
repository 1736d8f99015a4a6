"""TRL's token metrics from one no-grad fused-head pass (``token_stats``, ``mean_logits``) equal
the tiled eager pass (``logit_stats``) they replace: mean logit, top-1 and entropy."""

import pytest
import torch

from fastdpo import reference as R
from fastdpo.integrations.trl_metrics import logit_stats, mean_logits, token_stats


def _rows(seed=0, N=37, H=16, V=301, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 4
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    # a third of the rows get their argmax as the label: top-1 must say so
    z = rows @ weight.t() + (bias if with_bias else 0.0)
    labels[::3] = z[::3].argmax(-1)
    return rows, weight, bias, labels


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("opts", [dict(bias=False, scale=1.0), dict(bias=True, scale=0.7),
                                  dict(bias=True, scale=1.0, softcap=5.0)])
def test_token_stats_equal_the_tiled_pass(backend, opts):
    rows, weight, bias, labels = _rows(with_bias=opts["bias"])
    b = bias if opts["bias"] else None
    sc = opts.get("softcap")
    want = logit_stats(rows, weight, labels, b, sc, opts["scale"], entropy=True)
    got = token_stats(rows, weight, labels, b, sc, opts["scale"], entropy=True, backend=backend)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1], want[1]) and got[1][::3].all() and not got[1].all()
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    # and against float64
    z = R.head_logits(rows.double(), weight.double(), None if b is None else b.double(),
                      logit_scale=opts["scale"], softcap=sc)
    ent64 = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(got[2].double(), ent64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].double(), z.mean(-1), rtol=1e-5, atol=1e-6)
    assert token_stats(rows, weight, labels, b, sc, opts["scale"], backend=backend)[2] is None


def test_mean_logits_is_linear_without_softcap():
    rows, weight, bias, labels = _rows(seed=1)
    want = logit_stats(rows, weight, labels, bias, None, 1.3)[0]
    torch.testing.assert_close(mean_logits(rows, weight, bias, None, 1.3), want,
                               rtol=1e-5, atol=1e-6)
    want = logit_stats(rows, weight, labels, bias, 2.0, 1.3)[0]
    torch.testing.assert_close(mean_logits(rows, weight, bias, 2.0, 1.3), want,
                               rtol=1e-6, atol=1e-7)
