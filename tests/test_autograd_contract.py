"""What autograd must be told: in-place gradients bump the version counter, double backward is
refused rather than silently zero, and overlapping logits are refused for in-place backward."""

import pytest
import torch

import fastdpo


def _problem(seed=0, B=2, T=5, V=23):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    return logits, labels


def test_inplace_backward_bumps_version(backend):
    """The second backward of a retained graph reads logits the first one overwrote: it must
    raise (as autograd does for any in-place op), not compute a gradient from garbage."""
    logits, labels = _problem()
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0
    seq = fastdpo.sequence_logps(x, labels, inplace_backward=True, backend=backend)
    v0 = x._version
    seq.sum().backward(retain_graph=True)
    assert x._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        seq.sum().backward()


def test_two_inplace_calls_on_one_tensor_raise(backend):
    logits, labels = _problem(1)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0
    a = fastdpo.sequence_logps(x, labels, inplace_backward=True, backend=backend)
    b = fastdpo.sequence_logps(x, labels, shift=True, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (a.sum() + b.sum()).backward()


def test_inplace_gradient_still_correct(backend):
    logits, labels = _problem(2)
    ref = logits.clone().requires_grad_(True)
    fastdpo.sequence_logps(ref, labels, backend=backend).sum().backward()
    leaf = logits.clone().requires_grad_(True)
    fastdpo.sequence_logps(leaf * 1.0, labels, inplace_backward=True,
                           backend=backend).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_double_backward_refused(backend, inplace):
    logits, labels = _problem(3)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0
    lp = fastdpo.token_logps(x, labels, inplace_backward=inplace, backend=backend)
    loss = (lp.exp() * lp).sum()  # other paths depend on x too: a dropped term would be silent
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_double_backward_refused_linear(backend):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(19, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 19, (6,), generator=g)
    lp = fastdpo.linear_token_logps(h, w, y, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), h, create_graph=True)


def test_overlapping_logits_refused_for_inplace(backend):
    logits, labels = _problem(5, B=1)
    x = logits[:, :1].expand(1, 5, 23).clone().requires_grad_(True)
    y = (x * 1.0)[:, :1].expand(1, 5, 23)  # every row shares the memory of row 0
    with pytest.raises(ValueError, match="inplace_backward"):
        fastdpo.token_logps(y, labels, inplace_backward=True, backend=backend)
    # out of place is fine: the gradient goes to a fresh tensor
    fastdpo.token_logps(y, labels, backend=backend).sum().backward()
    assert torch.isfinite(x.grad).all()
