"""torch.library registration: opcheck on every loaded backend's row ops, and torch.compile."""

import pytest
import torch

import fastdpo
from fastdpo import ops


def sample(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 19, generator=g).to(dtype)
    labels = torch.randint(0, 19, (2, 4), generator=g)
    labels[0, 1] = -100
    return logits, labels


def test_opcheck_fwd(backend):
    logits, labels = sample()
    for ent in (False, True):
        torch.library.opcheck(ops.get_op(backend, "logps_fwd"),
                              (logits, labels, -100, 0.9, 0, 19, ent))


def test_opcheck_bwd(backend):
    logits, labels = sample()
    logp, m, s, ent = ops.get_op(backend, "logps_fwd")(logits, labels, -100, 0.9, 0, 19, True)
    g = torch.randn_like(logp)
    args = (g, torch.randn_like(logp), logits, labels, m, s, ent, -100, 0.9, 0, 19,
            torch.empty_like(logits))
    torch.library.opcheck(ops.get_op(backend, "logps_bwd"), args)
    args = (g[:, :-1].contiguous(), None, logits[:, 1:], labels[:, :-1], m[:, :-1].contiguous(),
            s[:, :-1].contiguous(), None, -100, 0.9, 0, 19, torch.empty_like(logits)[:, 1:])
    torch.library.opcheck(ops.get_op(backend, "logps_bwd"), args)


def test_fakes_tell_the_truth(backend):
    """Fake outputs have the real ones' shapes and dtypes; a dtype the backend refuses is refused
    by its fake too, so a compiled graph fails at trace time rather than at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    logits, labels = sample()
    real = ops.get_op(backend, "logps_fwd")(logits, labels, -100, 1.0, 0, 19, True)
    with FakeTensorMode() as mode:
        fl, fy = mode.from_tensor(logits), mode.from_tensor(labels)
        fake = ops.get_op(backend, "logps_fwd")(fl, fy, -100, 1.0, 0, 19, True)
        for r, f in zip(real, fake):
            assert (r.shape, r.dtype) == (f.shape, f.dtype)
        if torch.float64 not in ops.DTYPES[backend]:
            with pytest.raises(Exception, match="does not take"):
                ops.get_op(backend, "logps_fwd")(fl.double(), fy, -100, 1.0, 0, 19, True)


def test_compile_fullgraph():
    logits, labels = sample()

    def step(x, y):
        lp = fastdpo.sequence_logps(x, y, shift=True, backend="torch")
        tok = fastdpo.token_logps(x, y, backend="torch")
        return lp.sum() + tok.mean()

    x = logits.clone().requires_grad_(True)
    eager = step(x, labels)
    eager.backward()
    g_eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, labels)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, g_eager)


@pytest.mark.parametrize("name", ["inductor"])
def test_compile_inductor_no_graph_break(name):
    logits, labels = sample()
    compiled = torch.compile(lambda x, y: fastdpo.sequence_logps(x, y, backend="torch"),
                             fullgraph=True, backend=name)
    torch.testing.assert_close(compiled(logits, labels),
                               fastdpo.sequence_logps(logits, labels, backend="torch"))


def test_opcheck_linear_ops(backend):
    """The fused-LM-head ops pass opcheck on every backend, not only on torch."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(6, 8, generator=g), torch.randn(21, 8, generator=g)
    b, y = torch.randn(21, generator=g), torch.randint(0, 21, (6,), generator=g)
    y[1] = -100
    fwd = ops.get_op(backend, "linear_logps_fwd")
    for bi in (False, True):
        torch.library.opcheck(fwd, (h, w, b, y, -100, 0.9, 1.0, 2.0, 0, 21, True, bi))
        lp, m, s, ent = fwd(h, w, b, y, -100, 0.9, 1.0, 2.0, 0, 21, True, bi)
        args = (torch.randn(6, generator=g), torch.randn(6, generator=g), h, w, b, y, m, s, ent,
                -100, 0.9, 1.0, 2.0, 0, 21, True, True, True, bi)
        torch.library.opcheck(ops.get_op(backend, "linear_logps_bwd"), args)
