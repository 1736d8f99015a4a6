"""The fused LM head under FSDP2 (``fully_shard``), 2 gloo processes on CPU, against one process.

Under FSDP2 a parameter is a sharded DTensor except while its FSDP group is unsharded (inside
the group's forward, or after a forward whose group does not reshard). The fused head reads the
LM-head weight outside the head's own forward. Layouts tested: the head in the root group
(unsharded after the forward), in its own group that reshards (a DTensor when read), the same
on an HSDP (2-D) mesh, accelerate's tail group [norm, lm_head] whose forward never ran (a
DTensor too), a root that reshards after forward; tied embeddings where FSDP allows them. Each
case trains a few SGD steps on half of the batch per rank and must match one process on the
whole batch: the loss, the gathered gradients of the first step and the parameters after the
last.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import fastdpo
from fastdpo.integrations.hf import head_params
from test_distributed import _free_port

V, H, PAIRS, T = 37, 8, 4, 7  # V odd: the head's rows shard unevenly (19 + 18)
STEPS, LR = 2, 0.5


class Tiny(torch.nn.Module):
    """Embedding, two blocks, a final norm and an LM head (tied to the embedding if asked)."""

    def __init__(self, tied=False, bias=True):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(H, H),
                                                              torch.nn.Tanh()) for _ in range(2))
        self.norm = torch.nn.LayerNorm(H)
        self.lm_head = torch.nn.Linear(H, V, bias=bias and not tied)
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = x + b(x)
        return self.norm(x)


def _shard(model, layout):
    kw = {}
    if layout == "hsdp_head_own_group":  # 2-D mesh: (Replicate(), Shard(0)) placements
        from torch.distributed.device_mesh import init_device_mesh
        kw["mesh"] = init_device_mesh("cpu", (1, torch.distributed.get_world_size()),
                                      mesh_dim_names=("replicate", "shard"))
    for b in model.blocks:
        fully_shard(b, **kw)
    if layout.endswith("head_own_group"):  # resharded after its forward: a DTensor when read
        fully_shard(model.lm_head, **kw)
    elif layout == "accelerate_tail":    # accelerate's FSDP2 layout; the head's forward never ran
        tied = model.embed.weight is model.lm_head.weight
        if not tied:
            fully_shard(model.embed)
        tail = [model.norm, model.embed, model.lm_head] if tied else [model.norm, model.lm_head]
        fully_shard(tail, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=True if layout == "root_reshards" else None, **kw)
    return model


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (STEPS, 2 * PAIRS, T), generator=g)
    labels = ids.clone()
    labels[..., :2] = -100                    # a prompt
    labels[:, 1, 5:] = labels[:, PAIRS + 2, 4:] = -100  # padding
    ref = torch.randn(STEPS, 2 * PAIRS, generator=g) * 3 - 20
    return ids, labels, ref


def _rows(rank, world):
    """This rank's pairs: the batch is [chosen; rejected], each rank takes its block of pairs."""
    per = PAIRS // world
    chosen = list(range(rank * per, (rank + 1) * per))
    return chosen + [PAIRS + i for i in chosen]


def _loss(op, model, ids, labels, ref):
    hidden = model(ids)
    weight, bias, softcap, scale = head_params(model)
    kw = dict(bias=bias, shift=True, backend="torch", softcap=softcap, logit_scale=scale)
    if op == "sequence_logps":
        return -fastdpo.linear_sequence_logps(hidden, weight, labels, **kw).mean()
    n = ids.shape[0] // 2
    loss, _ = fastdpo.linear_dpo_loss(hidden, weight, labels, beta=0.1, loss_type="sigmoid",
                                      ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:], **kw)
    return loss


def _train(model, op, rows, pg=None):
    """SGD steps on ``rows`` of each batch: per-step losses (averaged over the ranks), the
    first step's gradients and the final parameters (full tensors)."""
    ids, labels, ref = _data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], None
    for s in range(STEPS):
        opt.zero_grad()
        loss = _loss(op, model, ids[s, rows], labels[s, rows], ref[s, rows])
        loss.backward()
        if grads is None:
            grads = {k: _full(p.grad) for k, p in model.named_parameters()}
        opt.step()
        loss = loss.detach().clone()
        if pg is not None:
            torch.distributed.all_reduce(loss, group=pg)
            loss /= torch.distributed.get_world_size(pg)
        losses.append(loss)
    params = {k: _full(p.detach()) for k, p in model.named_parameters()}
    return torch.stack(losses), grads, params


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


LAYOUTS = ("root", "head_own_group", "accelerate_tail", "root_reshards", "hsdp_head_own_group")
CASES = [(layout, op, tied) for layout in LAYOUTS for op in ("sequence_logps", "dpo_loss")
         for tied in (False, True)
         if not (tied and layout.endswith("head_own_group"))]  # tied: head stays with embedding


def _check_fsdp2(rank, world, pg):
    for layout, op, tied in CASES:
        what = f"{layout}/{op}/{'tied' if tied else 'untied'}"
        torch.manual_seed(0)
        single = Tiny(tied=tied)
        init = single.lm_head.weight.detach().clone()
        torch.manual_seed(0)
        sharded = _shard(Tiny(tied=tied), layout)
        want = _train(single, op, list(range(2 * PAIRS)))
        got = _train(sharded, op, _rows(rank, world), pg)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{what} loss: {m}")
        for part, g, w in (("grad", got[1], want[1]), ("param", got[2], want[2])):
            assert g.keys() == w.keys()
            for k in w:
                torch.testing.assert_close(g[k], w[k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{what} {part} {k}: {m}")
        head = "embed.weight" if tied else "lm_head.weight"
        assert (want[2][head] - init).abs().max() > 1e-3, f"{what}: the head did not train"


def _check_refusals(rank, world, pg):
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    from fastdpo.integrations.hf import full_param

    mesh = DeviceMesh("cpu", list(range(world)))
    w = distribute_tensor(torch.randn(V, H), mesh, [Shard(1)]).requires_grad_()
    # not FSDP's layout (e.g. tensor parallel on top of FSDP): a wrong gradient, so refused
    with pytest.raises(ValueError, match=r"lm_head.weight is a DTensor with placements \(Shard"):
        full_param(w, fsdp=True, name="lm_head.weight")
    # outside FSDP (tensor parallel, same data on every rank) the default gather stays
    w0 = distribute_tensor(torch.randn(V, H), mesh, [Shard(0)]).requires_grad_()
    full_param(w0, fsdp=False).sum().backward()
    torch.testing.assert_close(w0.grad.full_tensor(), torch.ones(V, H))


def _entry(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        _check_fsdp2(rank, world, dist.group.WORLD)
        _check_refusals(rank, world, dist.group.WORLD)
        # Without this, a rank that tears its groups down while the other still has gloo
        # work of DTensor/FSDP in flight aborts now and then at exit ("terminate called").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fused_head_under_fully_shard_matches_single_process():
    """One spawn (process start-up dominates): every layout, then the refused placements."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the children
    mp.spawn(_entry, args=(2, _free_port()), nprocs=2, join=True)
