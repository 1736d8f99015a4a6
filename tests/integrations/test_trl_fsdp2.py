"""FastDPOTrainer's loss under FSDP2 (``fully_shard``), 2 gloo processes on CPU, vs one process.

accelerate does not hand an FSDP plugin to a CPU (MULTI_CPU) run, so ``Trainer.train()`` cannot
run FSDP2 here. The test shards the trainer's policy and reference itself, as accelerate's
FSDP2 preparation does (every decoder layer, the embedding, a tail group [final norm, lm_head]
that does not reshard after forward, the root; with tied embeddings the embedding joins the
tail), sets ``is_fsdp_enabled`` as accelerate would, and runs the training step by hand:
``compute_loss``, backward, an optimizer step (SGD). A third layout puts the LM head in a group
of its own that reshards after forward, so the fused head reads a sharded (DTensor) weight.
Each rank takes half of every batch's pairs; the losses, all logged metrics, the gradient norm
and the parameters after the steps must equal one process training on the whole batches.
"""

from __future__ import annotations

import gc
import math
import os
import socket

import peers

peers.require("trl", "datasets")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from transformers import LlamaForCausalLM  # noqa: E402

import fastdpo.integrations.trl as fastdpo_trl  # noqa: E402
from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402
from test_trl import dataset, make_trainer, one_thread, tiny_llama, tokenizer  # noqa: E402,F401

STEPS, PAIRS, LR = 2, 4, 1.0
# layout -> tied embeddings; "head_own_group": the head's weight is a DTensor when the fused
# head reads it (its group reshards after the forward), the others: the unsharded tensor
LAYOUTS = {"accelerate": False, "accelerate_tied": True, "head_own_group": False}


def tied_llama(tok, seed=0):
    cfg = tiny_llama(tok).config
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _shard(model, layout):
    base = model.model
    for layer in base.layers:
        fully_shard(layer)
    if layout == "head_own_group":
        fully_shard(model.lm_head)
    elif LAYOUTS[layout]:  # accelerate keeps a tied head with its embedding, in the tail group
        fully_shard([base.norm, base.embed_tokens, model.lm_head], reshard_after_forward=False)
    else:
        fully_shard(base.embed_tokens)
        fully_shard([base.norm, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    return model


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _steps(tr, batches, pick=None, pg=None):
    """SGD steps through ``tr.compute_loss``; ``pick`` selects this rank's rows."""
    opt = torch.optim.SGD(tr.model.parameters(), lr=LR)
    tr.model.train()
    losses, norms = [], []
    for batch in batches:
        opt.zero_grad()
        loss = tr.compute_loss(tr.model, pick(batch) if pick else batch)
        loss.backward()
        norm = torch.sqrt(sum((_full(p.grad) ** 2).sum() for p in tr.model.parameters()))
        opt.step()
        loss = loss.detach().clone()
        if pg is not None:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss)
        norms.append(norm)
    metrics = {k: list(v) for k, v in tr._metrics["train"].items()}
    params = {k: _full(p.detach()).clone() for k, p in tr.model.named_parameters()}
    return torch.stack(losses), torch.stack(norms), metrics, params


def _rank_rows(rank, world):
    per = PAIRS // world
    chosen = list(range(rank * per, (rank + 1) * per))
    return chosen + [PAIRS + i for i in chosen]  # the batch is [chosen; rejected]


def _trainer(tok, tied, **kw):
    return make_trainer(FastDPOTrainer, tok, dataset("none"), steps=STEPS,
                        fastdpo_backend="torch", model_fn=tied_llama if tied else tiny_llama,
                        **kw)


def _worker(rank, world, port, out_dir, batches, wants):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tok = tokenizer.__wrapped__()
    rows = _rank_rows(rank, world)
    seen = []  # the head weight's type whenever the fused head reads it
    head_params = fastdpo_trl.head_params
    fastdpo_trl.head_params = lambda m: (
        seen.append(type(m.get_output_embeddings().weight).__name__), head_params(m))[1]
    for layout, tied in LAYOUTS.items():
        tr = _trainer(tok, tied, batch=PAIRS // world, ddp_backend="gloo", output_dir=out_dir)
        assert tr.args.world_size == world
        _shard(tr.model, layout)
        _shard(tr.ref_model, layout)
        tr.is_fsdp_enabled = True  # what accelerate's FSDP plugin sets (not given on CPU)
        seen.clear()
        got = _steps(tr, batches, pick=lambda b: {k: v[rows] for k, v in b.items()}, pg=True)
        assert set(seen) == {"DTensor" if layout == "head_own_group" else "Parameter"}, seen
        want = wants[tied]
        for name, g, w in (("loss", got[0], want[0]), ("grad norm", got[1], want[1])):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{layout} {name}: {m}")
        assert got[2].keys() == want[2].keys()
        for k, w in want[2].items():
            assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
                       for a, b in zip(got[2][k], w)), f"{layout} {k}: {got[2][k]} vs {w}"
        for k, w in want[3].items():
            torch.testing.assert_close(got[3][k], w, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{layout} param {k}: {m}")
    # let no gloo work of DTensor/FSDP be in flight when a rank tears down (see test_fsdp2.py)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_fastdpo_trainer_under_fully_shard_matches_single_process(tokenizer, tmp_path):
    wants, batches = {}, None
    for tied in (False, True):
        single = _trainer(tokenizer, tied, batch=PAIRS, output_dir=str(tmp_path))
        if batches is None:
            it = iter(single.get_train_dataloader())
            batches = [single._prepare_inputs(next(it)) for _ in range(STEPS)]
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        init = dict(single.model.named_parameters())[head].detach().clone()
        wants[tied] = _steps(single, batches)
        assert (wants[tied][3][head] - init).abs().max() > 1e-4  # the head trained
        assert wants[tied][0][1] != wants[tied][0][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path), batches, wants), nprocs=2, join=True)
