"""fastdpo.Workspace: the fused head's chunk buffers kept between calls. The results are bitwise
those of fresh buffers, whatever the buffers held before; the buffers are reused, grown and
released as documented; and a second caller while one runs is refused, not aliased."""

import pytest
import torch

import fastdpo
BACKENDS = ["native", "torch"]


def make(B=2, T=48, H=16, V=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, H, generator=g).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.25).requires_grad_(True)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, : T // 4] = -100
    return h, w, y, torch.randn(B, generator=g), torch.randn(B, generator=g)


def dpo(h, w, y, rc, rr, **kw):
    loss, _ = fastdpo.linear_dpo_loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr, **kw)
    return (loss, *torch.autograd.grad(loss, [h, w]))


def poison(ws):
    for buf in ws._bufs.values():
        buf.fill_(float("nan"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [{}, {"softcap": 5.0, "temperature": 0.7},
                                  {"batch_invariant": True}, {"loss_type": "ipo"}])
def test_same_bits_as_fresh_buffers_whatever_they_held(backend, opts):
    h, w, y, rc, rr = make()
    want = dpo(h, w, y, rc, rr, backend=backend, **opts)
    ws = fastdpo.Workspace()
    for _ in range(2):
        got = dpo(h, w, y, rc, rr, backend=backend, workspace=ws, **opts)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert ws.nbytes > 0
        poison(ws)  # what the last call left must never be read


@pytest.mark.parametrize("backend", BACKENDS)
def test_family_losses_take_it_too(backend):
    h, w, y, _, _ = make(seed=3)
    ws = fastdpo.Workspace()
    for fn in (fastdpo.linear_cpo_loss, fastdpo.linear_orpo_loss):
        want = fn(h, w, y, backend=backend)[0]
        got = fn(h, w, y, backend=backend, workspace=ws)[0]
        poison(ws)
        again = fn(h, w, y, backend=backend, workspace=ws)[0]
        assert torch.equal(got, want) and torch.equal(again, want), fn.__name__
    assert ws.nbytes > 0


def test_native_kept_chunk_reuses_grows_and_releases(kept_buffers):
    seen = kept_buffers
    ws = fastdpo.Workspace()
    h, w, y, rc, rr = make()
    dpo(h, w, y, rc, rr, backend="native", workspace=ws)
    held = ws.nbytes
    dpo(h, w, y, rc, rr, backend="native", workspace=ws)
    assert len(seen) == 2 and seen[0] == seen[1] and ws.nbytes == held  # the same buffer
    h2, w2, y2, rc2, rr2 = make(B=4, T=96)  # a larger chunk: grown, the smaller one freed
    dpo(h2, w2, y2, rc2, rr2, backend="native", workspace=ws)
    assert ws.nbytes > held
    dpo(h, w, y, rc, rr, backend="native", workspace=ws)  # smaller again: no shrink, no new
    assert seen[3] == seen[2]
    ws.release()
    assert ws.nbytes == 0 and "0 buffers" in repr(ws)


def test_a_second_caller_is_refused():
    ws = fastdpo.Workspace()
    h, w, y, rc, rr = make()
    with ws:  # another call holds it
        with pytest.raises(RuntimeError, match="in use by another call"):
            dpo(h, w, y, rc, rr, backend="native", workspace=ws)
    dpo(h, w, y, rc, rr, backend="native", workspace=ws)  # free again once that call is done


def test_wrong_type_names_the_argument():
    h, w, y, rc, rr = make()
    with pytest.raises(TypeError, match="workspace must be a fastdpo.Workspace"):
        dpo(h, w, y, rc, rr, workspace={})


def test_modules_pass_theirs_and_copies_start_empty(kept_buffers):
    import copy
    import pickle

    h, w, y, rc, rr = make(seed=5)
    ws = fastdpo.Workspace()
    want = fastdpo.DPOLoss(backend="native")(hidden=h, weight=w, labels=y, ref_logps=(rc, rr))[0]
    mod = fastdpo.DPOLoss(backend="native", workspace=ws)
    for _ in range(2):
        got = mod(hidden=h, weight=w, labels=y, ref_logps=(rc, rr))[0]
        assert torch.equal(got, want)
    assert ws.nbytes > 0 and kept_buffers[-1] == kept_buffers[-2]
    orpo = fastdpo.ORPOLoss(backend="native", workspace=ws)
    assert torch.equal(orpo(hidden=h, weight=w, labels=y)[0],
                       fastdpo.ORPOLoss(backend="native")(hidden=h, weight=w, labels=y)[0])
    for clone in (copy.deepcopy(mod).workspace, pickle.loads(pickle.dumps(ws))):
        assert isinstance(clone, fastdpo.Workspace) and clone is not ws and clone.nbytes == 0
    with pytest.raises(TypeError, match="workspace"):
        fastdpo.CPOLoss(workspace="yes")
