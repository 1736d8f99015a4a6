"""Vocabulary-parallel and data-parallel runs on CPU (gloo), checked against one process.

Each test spawns a small group once and runs all its cases inside the workers (process start-up
dominates the cost); a failing assertion in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdpo
import fastdpo.reference

V_TOTAL = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, check):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        check(rank, world, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def spawn(check, world):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the children
    mp.spawn(_entry, args=(world, _free_port(), check), nprocs=world, join=True)


def _close(a, b, what, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _problem(seed, shape=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, V_TOTAL, generator=g) * 3
    labels = torch.randint(0, V_TOTAL, shape, generator=g)
    labels.view(-1)[torch.randperm(labels.numel(), generator=g)[:3]] = -100
    g_logp = torch.randn(shape, generator=g)
    g_ent = torch.randn(shape, generator=g)
    return logits, labels, g_logp, g_ent


# ------------------------------------------------------------------------ logits path


def _check_logits_path(rank, world, pg):
    per = V_TOTAL // world
    sl = slice(rank * per, (rank + 1) * per)
    cases = [dict(shift=False, temperature=1.0, ent=True),
             dict(shift=True, temperature=0.7, ent=True),
             dict(shift=True, temperature=1.0, ent=False),
             dict(shift=False, temperature=1.3, ent=False, flat=True)]
    for i, c in enumerate(cases):
        logits, labels, g_logp, g_ent = _problem(10 + i)
        if c.get("flat"):  # (N, V) input
            logits, labels = logits.reshape(-1, V_TOTAL), labels.reshape(-1)
            g_logp, g_ent = g_logp.reshape(-1), g_ent.reshape(-1)
        if c["shift"]:
            g_logp, g_ent = g_logp[..., 1:], g_ent[..., 1:]
        kw = dict(shift=c["shift"], temperature=c["temperature"], return_entropy=c["ent"],
                  backend="torch")
        # one process, full vocabulary
        full = logits.clone().requires_grad_(True)
        out = fastdpo.token_logps(full, labels, **kw)
        lp1, en1 = out if c["ent"] else (out, None)
        loss1 = (lp1 * g_logp).sum() + ((en1 * g_ent).sum() if c["ent"] else 0)
        loss1.backward()
        # this rank's shard
        for inplace in (False, True):
            leaf = logits[..., sl].clone().requires_grad_(True)
            shard = leaf * 1.0 if inplace else leaf
            out = fastdpo.token_logps(shard, labels, process_group=pg, inplace_backward=inplace,
                                      **kw)
            lp, en = out if c["ent"] else (out, None)
            _close(lp, lp1, f"case {i} logp")
            if c["ent"]:
                _close(en, en1, f"case {i} entropy")
            loss = (lp * g_logp).sum() + ((en * g_ent).sum() if c["ent"] else 0)
            loss.backward()
            _close(leaf.grad, full.grad[..., sl], f"case {i} grad (inplace={inplace})")
        # reference against the float64 oracle too (not just against ourselves)
        ref = fastdpo.reference.token_logps(logits, labels, shift=c["shift"],
                                            temperature=c["temperature"])
        _close(lp.double(), ref, f"case {i} vs oracle", tol=1e-5)

    # no-grad pass, sequence_logps through the public API, and a bad label giving NaN
    logits, labels, _, _ = _problem(20)
    labels[0, 2] = V_TOTAL + 3
    with torch.no_grad():
        lp = fastdpo.token_logps(logits[..., sl], labels, process_group=pg, validate=False,
                                 backend="torch")
    ref = fastdpo.reference.token_logps(logits, labels)
    assert torch.isnan(lp[0, 2]) and torch.isnan(ref[0, 2])
    _close(lp.double(), ref, "no-grad with bad label", tol=1e-5)
    with pytest.raises(ValueError, match="labels must lie"):
        fastdpo.token_logps(logits[..., sl], labels, process_group=pg)
    labels[0, 2] = 1
    with pytest.raises(ValueError, match="labels differ across the ranks"):
        other = torch.where(labels >= 0, (labels + rank) % V_TOTAL, labels)
        fastdpo.token_logps(logits[..., sl], other, process_group=pg)
    x = logits[..., sl].clone().requires_grad_(True)
    seq = fastdpo.sequence_logps(x, labels, shift=True, average=True, process_group=pg)
    xf = logits.clone().requires_grad_(True)
    seq1 = fastdpo.sequence_logps(xf, labels, shift=True, average=True)
    _close(seq, seq1, "sequence_logps")
    seq.sum().backward()
    seq1.sum().backward()
    _close(x.grad, xf.grad[..., sl], "sequence_logps grad")


# ------------------------------------------------------------------------ fused LM head


def _check_linear_path(rank, world, pg):
    from fastdpo.linear import linear_sequence_logps, linear_token_logps

    per = V_TOTAL // world
    sl = slice(rank * per, (rank + 1) * per)
    H = 6
    cases = [dict(shift=True, ent=True, bias=True, softcap=4.0, logit_scale=0.5, temperature=0.8),
             dict(shift=False, ent=False, bias=False, softcap=None, logit_scale=1.0,
                  temperature=1.0, flat=True),
             dict(shift=True, ent=False, bias=True, softcap=None, logit_scale=2.0,
                  temperature=1.0)]
    for i, c in enumerate(cases):
        g = torch.Generator().manual_seed(40 + i)
        hidden = torch.randn(2, 5, H, generator=g)
        weight = torch.randn(V_TOTAL, H, generator=g)
        bias = torch.randn(V_TOTAL, generator=g) if c["bias"] else None
        _, labels, g_logp, g_ent = _problem(40 + i)
        if c.get("flat"):
            hidden, labels = hidden.reshape(-1, H), labels.reshape(-1)
            g_logp, g_ent = g_logp.reshape(-1), g_ent.reshape(-1)
        if c["shift"]:
            g_logp, g_ent = g_logp[..., 1:], g_ent[..., 1:]
        kw = dict(shift=c["shift"], return_entropy=c["ent"], softcap=c["softcap"],
                  logit_scale=c["logit_scale"], temperature=c["temperature"], backend="torch")

        def run(w, b, pg=None):
            h = hidden.clone().requires_grad_(True)
            w = w.clone().requires_grad_(True)
            b = None if b is None else b.clone().requires_grad_(True)
            out = linear_token_logps(h, w, labels, bias=b, process_group=pg, **kw)
            lp, en = out if c["ent"] else (out, None)
            ((lp * g_logp).sum() + ((en * g_ent).sum() if c["ent"] else 0)).backward()
            return lp, en, h.grad, w.grad, None if b is None else b.grad

        lp1, en1, dh1, dw1, db1 = run(weight, bias)
        lp, en, dh, dw, db = run(weight[sl], None if bias is None else bias[sl], pg)
        _close(lp, lp1, f"linear case {i} logp")
        if c["ent"]:
            _close(en, en1, f"linear case {i} entropy")
        _close(dh, dh1, f"linear case {i} d_hidden (all-reduced)")
        _close(dw, dw1[sl], f"linear case {i} d_weight (local rows)")
        if c["bias"]:
            _close(db, db1[sl], f"linear case {i} d_bias (local)")
        # the shards against plain logits through the float64 oracle (no fused code involved)
        z = hidden.double() @ weight.double().T
        if bias is not None:
            z = z + bias.double()
        z = z * c["logit_scale"]
        if c["softcap"]:
            z = c["softcap"] * torch.tanh(z / c["softcap"])
        ref = fastdpo.reference.token_logps(z, labels, shift=c["shift"],
                                            temperature=c["temperature"])
        _close(lp.double(), ref, f"linear case {i} vs oracle", tol=1e-5)
        with torch.no_grad():  # no-graph pass and the sequence reduction, through the public API
            seq = linear_sequence_logps(hidden, weight[sl], labels, process_group=pg,
                                        **{**kw, "return_entropy": False})
            seq1 = linear_sequence_logps(hidden, weight, labels, **{**kw, "return_entropy": False})
        _close(seq, seq1, f"linear case {i} sequence no-grad")


def _check_uneven_shards(rank, world, pg):
    """Shards of unequal sizes (the split 127/127/127/126 of V=507 that Cut Cross-Entropy uses,
    scaled down) and logits offset by 1e4: the offsets come from the gathered sizes."""
    from fastdpo.linear import linear_token_logps

    V = 4 * world - 1  # the last rank holds one column fewer
    sizes = [4] * (world - 1) + [3]
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, V, generator=g) * 3 + 1e4
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 0], labels[1, 1], labels[1, 2] = V - 1, -100, 0  # last and first shard's ranges
    g_logp = torch.randn(2, 5, generator=g)
    full = logits.clone().requires_grad_(True)
    lp1, en1 = fastdpo.token_logps(full, labels, return_entropy=True, backend="torch")
    (lp1 * g_logp).sum().backward()
    x = logits[..., sl].clone().requires_grad_(True)
    lp, en = fastdpo.token_logps(x, labels, return_entropy=True, process_group=pg,
                                 backend="torch")
    (lp * g_logp).sum().backward()
    ref, ref_en = fastdpo.reference.token_logps(logits, labels, return_entropy=True)
    _close(lp.double(), ref, "uneven logp vs oracle", tol=1e-5)
    _close(en.double(), ref_en, "uneven entropy vs oracle", tol=1e-5)
    _close(x.grad, full.grad[..., sl], "uneven grad")
    # the fused head with unevenly sharded weight rows
    hidden = torch.randn(2, 5, 6, generator=g)
    weight = torch.randn(V, 6, generator=g)
    with torch.no_grad():
        lpl = linear_token_logps(hidden, weight[sl], labels, process_group=pg, backend="torch")
    z = hidden.double() @ weight.double().T
    _close(lpl.double(), fastdpo.reference.token_logps(z, labels), "uneven linear", tol=1e-5)
    # a label past the global vocabulary is refused on every rank alike (no rank waits alone)
    bad = labels.clone()
    bad[0, 3] = V
    with pytest.raises(ValueError, match="labels must lie"):
        fastdpo.token_logps(logits[..., sl], bad, process_group=pg, backend="torch")


def _check_vocab_parallel(rank, world, pg):
    _check_logits_path(rank, world, pg)
    _check_linear_path(rank, world, pg)
    _check_uneven_shards(rank, world, pg)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel(world):
    """Logits and fused-LM-head paths on W shards == one process: values, entropy, gradients."""
    spawn(_check_vocab_parallel, world)


# ------------------------------------------------------------------------ data parallel


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=V_TOTAL, hidden=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _dpo_loss(model, ids, labels, ref_logps, beta=0.1):
    """Sigmoid DPO over [chosen; rejected] halves; a per-pair mean, as the losses are."""
    logps = fastdpo.sequence_logps(model(ids), labels, shift=True)
    ch, rj = logps.chunk(2)
    rch, rrj = ref_logps.chunk(2)
    return -torch.nn.functional.logsigmoid(beta * ((ch - rch) - (rj - rrj))).mean()


def _ddp_batch():
    g = torch.Generator().manual_seed(5)
    pairs, T = 4, 6
    ids = torch.randint(0, V_TOTAL, (2 * pairs, T), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100  # the prompt
    ref = torch.randn(2 * pairs, generator=g) - 8
    return ids, labels, ref


def _check_ddp(rank, world, pg):
    torch.manual_seed(0)
    model = _TinyLM()
    single = _TinyLM()
    single.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids, labels, ref = _ddp_batch()
    # every rank: the pairs rank::world, chosen and rejected halves kept aligned
    pairs = ids.shape[0] // 2
    mine = torch.arange(rank, pairs, world)
    rows = torch.cat([mine, mine + pairs])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    opt1 = torch.optim.SGD(single.parameters(), lr=0.5)
    for _ in range(2):  # two steps: the second sees the synchronised update of the first
        opt.zero_grad()
        opt1.zero_grad()
        loss = _dpo_loss(ddp, ids[rows], labels[rows], ref[rows])
        loss.backward()
        loss1 = _dpo_loss(single, ids, labels, ref)
        loss1.backward()
        for (name, p), p1 in zip(model.named_parameters(), single.parameters()):
            _close(p.grad, p1.grad, f"DDP grad {name}", tol=1e-5)
        opt.step()
        opt1.step()
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        _close(avg / world, loss1.detach(), "DDP mean loss", tol=1e-5)


def test_ddp_matches_single_process():
    spawn(_check_ddp, 2)
