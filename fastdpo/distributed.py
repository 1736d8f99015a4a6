"""Vocabulary-parallel log-probabilities over ``torch.distributed`` (Megatron-style LM-head sharding).

Each rank of ``process_group`` holds a contiguous slice of the vocabulary, in rank order, of any
size (uneven splits such as 127/127/127/126 included): the offsets come from the gathered sizes.
Labels are global ids and the same on every rank. The row ops already work on a shard
(``vocab_start`` / ``vocab_total``, see :mod:`fastdpo.ops`): rank ``r`` gets its shard's
``(logp_r, row_max_r, log_sum_r, H_r)``.

**Forward: one collective.** Every rank packs those (fp32, O(tokens)) and one ``all_gather``
gives every rank all ``W`` rows, from which :func:`fastdpo.rows.combine` forms the global values
exactly and stably (each shard's share ``a_r = (m_r - M) c + log_sum_r``, ``L = logsumexp_r a_r``,
``logp = logp_holder + a_holder - L``, ``H = sum_r w_r (H_r - log w_r)`` with
``w_r = exp(a_r - L)``). Finding the offsets costs one more all-gather of one integer per rank.

An all-reduce scheme needs the global maximum before it can sum ``exp(lse_r - max)`` safely, i.e.
two dependent collectives (Megatron uses three all-reduces); the all-gather moves ``W`` times more
bytes, but those are ``W * 3 * 4`` bytes per token against ``V/W * 2`` bytes of logits per token,
and it is one latency instead of two or three.

**Backward: no collective for the logits.** The bwd op, given the *global* row statistics and
``H``, computes ``p`` on the local shard, which is the global softmax restricted to the
shard, and adds the one-hot term only where the label is local: that is exactly ``d loss / d shard``.
This holds when ``grad_logp`` (and ``grad_entropy``) are the same on every rank of the group, i.e.
the loss is computed identically on every rank from the replicated log-probs, as in tensor
parallelism (the ranks see the same batch). If ranks instead computed *different* losses from the
same log-probs, the gradient of their sum would need ``grad_logp`` all-reduced first; we do not
pay for that collective.

For the fused LM head the hidden states are replicated and the weight rows are sharded, so each
shard contributes part of ``d hidden``: it is summed over the group (one all-reduce) while
``d weight`` / ``d bias`` stay local.

Data parallelism (DDP / FSDP) needs nothing from this module: the ops are per-device and the
losses are per-pair means, so the usual gradient averaging over ranks is correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import rows

__all__ = ["Shards", "shard_setup", "check_same_labels"]


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given but torch.distributed is not initialised")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    return rank, dist.get_world_size(group)


def _all_gather(packed: torch.Tensor, group, world: int) -> torch.Tensor:
    """One collective: ``(k, ...)`` on every rank -> ``(world, k, ...)``."""
    flat = packed.contiguous().view(-1)
    out = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(out, flat, group=group)  # the layout gloo and NCCL both take
    return out.view((world,) + tuple(packed.shape))


def check_same_labels(labels, group) -> None:
    """Checked mode: every rank must hold the same labels (one 2-element all-reduce).

    Ranks of a vocabulary-parallel group score the same tokens; different labels (say, a data-
    parallel batch split by mistake) would otherwise combine into silently wrong log-probs.
    """
    lab = labels.reshape(-1).long()
    # a position-weighted checksum: exact in int64 for any realistic batch, order-sensitive
    w = (torch.arange(lab.numel(), device=lab.device) * 2654435761) % 1000003 + 1
    h = torch.stack([(lab * w).sum(), torch.tensor(lab.numel(), device=lab.device)])
    both = torch.cat([h, -h])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:2], -both[2:]):
        raise ValueError("labels differ across the ranks of process_group: a vocabulary-parallel "
                         "group must score the same tokens on every rank")


@dataclass(frozen=True)
class Shards:
    """This rank's place in a vocabulary-parallel group: combines the shards' row statistics in
    forward, and sums ``d hidden`` over the group (fused LM head)."""

    group: object
    ignore_index: int
    starts: tuple   # global id of each rank's first column
    sizes: tuple    # columns of each rank
    rank: int

    @property
    def vocab_start(self) -> int:
        return self.starts[self.rank]

    @property
    def vocab_total(self) -> int:
        return self.starts[-1] + self.sizes[-1]

    def combine(self, logp_r, row_max_r, log_sum_r, ent_r, labels, temperature, with_entropy):
        """Global ``(logp, row_max, log_sum, entropy)`` from every rank's (one all-gather)."""
        parts = [logp_r, row_max_r, log_sum_r] + ([ent_r] if with_entropy else [])
        g = _all_gather(torch.stack(parts), self.group, len(self.sizes))
        lab = labels.long()
        starts = torch.tensor(self.starts, device=lab.device).view((-1,) + (1,) * lab.dim())
        sizes = torch.tensor(self.sizes, device=lab.device).view(starts.shape)
        active = lab != self.ignore_index
        holder = active & (lab >= starts) & (lab < starts + sizes)
        logp, m, s, ent = rows.combine(g[:, 0], g[:, 1], g[:, 2], g[:, 3] if with_entropy else None,
                                       holder, active, temperature)
        return logp, m, s, (ent_r if ent is None else ent)  # ent_r: the op's empty placeholder

    def reduce_hidden_grad(self, d_hidden) -> None:
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=self.group)


def shard_setup(labels, process_group, vocab_local: int, ignore_index: int, checked: bool,
                device) -> Shards:
    """The :class:`Shards` of this call: every rank's offset from the gathered shard sizes (one
    small all-gather), then, in checked mode, the cross-rank label check. Collectives come first
    and are the same on every rank, so no rank raises alone while the others wait."""
    rank, world = _world(process_group)
    sizes = _all_gather(torch.tensor([vocab_local], dtype=torch.int64, device=device),
                        process_group, world).view(-1).tolist()
    if checked:
        check_same_labels(labels, process_group)
    if min(sizes) < 1:
        raise ValueError(f"every rank of process_group needs a non-empty vocabulary shard, got "
                         f"sizes {sizes}")
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    return Shards(process_group, ignore_index, tuple(starts), tuple(sizes), rank)
