"""Outputs users of the peers ask for: several label ids a position, the per-row log-sum-exp
(differentiable, for a z-loss), and logits of any leading shape; against the float64 oracle."""

import pytest
import torch

import fastdpo
from tolerance import assert_rule


def _problem(shape, V, k=None, seed=0, dtype=torch.float32, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * 3 + offset).to(dtype)
    lab_shape = shape + ((k,) if k else ())
    labels = torch.randint(0, V, lab_shape, generator=g)
    labels.view(-1)[torch.rand(labels.numel(), generator=g) < 0.2] = -100
    return logits, labels


def _ref(logits, labels, temperature, shift, dtype):
    """log-softmax in ``dtype`` (float64: the oracle), gathered at each label."""
    x = logits.to(dtype)
    if shift:
        x, labels = x[..., :-1, :], labels[..., 1:, :] if labels.dim() == x.dim() else labels[..., 1:]
    ls = torch.log_softmax(x / temperature, -1)
    multi = labels.dim() == x.dim()
    lab = labels if multi else labels[..., None]
    lp = ls.gather(-1, lab.clamp(min=0)).masked_fill(lab == -100, 0.0)
    lse = torch.logsumexp(x / temperature, -1)
    return (lp if multi else lp[..., 0]), lse


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_several_labels_and_lse(backend, shift, temperature):
    logits, labels = _problem((2, 6), 37, k=3, seed=1, offset=500.0)
    x = logits.clone().requires_grad_(True)
    lp, lse = fastdpo.token_logps(x, labels, shift=shift, temperature=temperature,
                                  return_lse=True, backend=backend)
    x64 = logits.double().requires_grad_(True)
    lp64, lse64 = _ref(x64, labels, temperature, shift, torch.float64)
    xlo = logits.clone().requires_grad_(True)
    lplo, lselo = _ref(xlo, labels, temperature, shift, torch.float32)
    active = ((labels[:, 1:] if shift else labels) != -100).any(-1)  # any of the k ids
    lse64, lselo = lse64 * active, lselo * active  # ignored rows report 0
    assert lp.shape == lp64.shape and lse.shape == lse64.shape
    assert_rule(lp, lp64, lplo, torch.float32, what="logps")
    assert_rule(lse, lse64, lselo, torch.float32, what="lse")
    g = torch.Generator().manual_seed(2)
    w, u = torch.randn(lp.shape, generator=g), torch.randn(lse.shape, generator=g)
    for a, b, xx in ((lp, lse, x), (lp64, lse64, x64), (lplo, lselo, xlo)):
        ((a * w.to(a.dtype)).sum() + (b * u.to(b.dtype) * b).sum()).backward()  # z-loss-like
    assert_rule(x.grad, x64.grad, xlo.grad, torch.float32, what="grad")


def test_one_label_with_lse_matches_plain(backend):
    logits, labels = _problem((3, 4), 29, seed=3)
    lp, lse = fastdpo.token_logps(logits, labels, return_lse=True, backend=backend)
    torch.testing.assert_close(lp, fastdpo.token_logps(logits, labels, backend=backend))
    want = torch.logsumexp(logits.double(), -1) * (labels != -100)
    torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-5)


def test_any_leading_shape(backend):
    logits, labels = _problem((2, 3, 4), 19, seed=4)
    lp, ent = fastdpo.token_logps(logits, labels, return_entropy=True, shift=True,
                                  backend=backend)
    assert lp.shape == (2, 3, 3) and ent.shape == (2, 3, 3)
    flat = fastdpo.token_logps(logits.view(6, 4, 19), labels.view(6, 4), shift=True,
                               backend=backend)
    torch.testing.assert_close(lp, flat.view(2, 3, 3))


def test_label_shape_errors():
    logits, labels = _problem((2, 3), 11)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastdpo.token_logps(logits, labels[:, :2])
    with pytest.raises(ValueError, match="cannot be viewed"):
        fastdpo.token_logps(torch.randn(3, 2, 4, 11).transpose(0, 2), torch.zeros(4, 2, 3,
                                                                               dtype=torch.long))
