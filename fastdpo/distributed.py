"""Vocabulary-parallel log-probabilities over ``torch.distributed`` (Megatron-style LM-head sharding).

Each rank of ``process_group`` holds an equal contiguous slice of the vocabulary: rank ``r`` of
``W`` holds ids ``[r * V/W, (r + 1) * V/W)`` of the logits (or rows of the LM-head weight). Labels
are global ids and the same on every rank. The row ops already work on a shard (``vocab_start`` /
``vocab_total``, see :mod:`fastdpo.ops`): rank ``r`` gets

* ``lse_r``: log-sum-exp of its shard,
* ``logp_r``: ``z[label] - lse_r`` when the label is in the shard, else ``-lse_r``; so the label
  logit is ``zl_r = logp_r + lse_r`` on the rank that holds it and exactly 0 elsewhere,
* ``H_r``: the entropy of the softmax over its shard; ``E_r[z] = lse_r - H_r``.

**Forward: one collective.** Every rank packs ``[lse_r, zl_r(, E_r[z])]`` (fp32, O(tokens)) and
one ``all_gather`` gives every rank all ``W`` rows, from which it forms, exactly and stably::

    lse  = logsumexp_r lse_r
    logp = sum_r zl_r - lse
    H    = lse - sum_r exp(lse_r - lse) * E_r[z]

An all-reduce scheme needs the global maximum before it can sum ``exp(lse_r - max)`` safely, i.e.
two dependent collectives (Megatron uses three all-reduces); the all-gather moves ``W`` times more
bytes, but those are ``W * 3 * 4`` bytes per token against ``V/W * 2`` bytes of logits per token,
and it is one latency instead of two or three.

**Backward: no collective for the logits.** The bwd op, given the *global* ``lse`` and ``H``,
computes ``p = exp(z - lse)`` on the local shard, which is the global softmax restricted to the
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

import torch
import torch.distributed as dist

from dataclasses import dataclass

from . import _validate as V

__all__ = ["vocab_parallel_token_logps", "vocab_parallel_linear_token_logps", "shard_range",
           "combine_shards", "check_same_labels", "Shards"]


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given but torch.distributed is not initialised")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    return rank, dist.get_world_size(group)


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


def shard_range(vocab_total: int, group) -> tuple[int, int]:
    """``(vocab_start, vocab_end)`` of this rank's contiguous vocabulary shard."""
    rank, world = _world(group)
    if vocab_total % world:
        raise ValueError(f"vocabulary size {vocab_total} does not split evenly over {world} ranks")
    per = vocab_total // world
    return rank * per, (rank + 1) * per


def _all_gather(packed: torch.Tensor, group, world: int) -> torch.Tensor:
    """One collective: ``(k, ...)`` on every rank -> ``(world, k, ...)``."""
    flat = packed.contiguous().view(-1)
    out = flat.new_empty(world * flat.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=group)  # concatenated form: the one layout gloo and NCCL both take
    return out.view((world,) + tuple(packed.shape))


def combine_shards(logp_r, lse_r, ent_r, labels, *, ignore_index, vocab_start, vocab_local, group,
                   with_entropy):
    """Global ``(logp, lse, entropy)`` from each rank's per-shard row statistics (one all-gather).

    ``labels`` has the shape of ``logp_r``. Ignored rows come out 0 everywhere (as the ops' rows).
    """
    _, world = _world(group)
    lab = labels.long()
    active = lab != ignore_index
    local = active & (lab >= vocab_start) & (lab < vocab_start + vocab_local)
    # z_label from the shard that holds it; an exact 0 elsewhere even if lse_r is infinite. A bad
    # label leaves logp_r NaN on every rank (the op checks against vocab_total), so it stays NaN.
    bad = torch.isnan(logp_r)
    zl_r = torch.where(local | bad, logp_r + lse_r, 0.0)
    parts = [lse_r, zl_r]
    if with_entropy:
        parts.append(lse_r - ent_r)  # E_r[z] over the shard's own softmax
    g = _all_gather(torch.stack(parts), group, world)
    lse_all = g[:, 0]
    lse = torch.logsumexp(lse_all, dim=0)
    logp = g[:, 1].sum(0) - lse
    ent = None
    if with_entropy:
        w = torch.exp(lse_all - lse)
        # a shard whose logits are all -inf (lse_r = -inf, as the native backend reports it) has
        # weight 0 and an undefined mean: drop it rather than turn the entropy into NaN
        ent = lse - torch.where(w > 0, w * g[:, 2], 0.0).sum(0)
        ent = torch.where(active, ent, 0.0)
    return torch.where(active, logp, 0.0), torch.where(active, lse, 0.0), ent


@dataclass(frozen=True)
class Shards:
    """What the single-device autograd Functions need to run on a vocabulary shard: combine the
    shards' row statistics in forward, and sum ``d hidden`` over the group (fused LM head)."""

    group: object
    ignore_index: int
    vocab_start: int
    with_entropy: bool

    def combine(self, logp_r, lse_r, ent_r, labels, vocab_local):
        logp, lse, ent = combine_shards(logp_r, lse_r, ent_r, labels,
                                        ignore_index=self.ignore_index,
                                        vocab_start=self.vocab_start, vocab_local=vocab_local,
                                        group=self.group, with_entropy=self.with_entropy)
        return logp, lse, (ent_r if ent is None else ent)  # ent_r: the op's empty placeholder

    def reduce_hidden_grad(self, d_hidden) -> None:
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=self.group)


def _shard_setup(labels, process_group, vocab_local, ignore_index, validate, device,
                 with_entropy):
    """Shard range, the cross-rank label check, and the :class:`Shards` of this call."""
    _, world = _world(process_group)
    vocab_total = vocab_local * world
    vocab_start, _ = shard_range(vocab_total, process_group)
    if V.checked_mode(validate, device):
        # the collective first: a rank must not raise alone and leave the others waiting
        check_same_labels(labels, process_group)
    return vocab_start, vocab_total, Shards(process_group, ignore_index, vocab_start, with_entropy)


def vocab_parallel_token_logps(logits, labels, process_group, *, ignore_index=-100, temperature=1.0,
                               shift=False, return_entropy=False, inplace_backward=False,
                               backend="auto", validate=None):
    """:func:`fastdpo.token_logps` over a vocabulary shard of the logits on each rank.

    ``logits`` is this rank's ``(B, T, V/W)`` or ``(N, V/W)`` slice (rank ``r`` holds global ids
    ``[r*V/W, (r+1)*V/W)``); ``labels`` are global ids, identical on every rank. Returns the global
    log-probs (and entropy), identical on every rank. Backward assumes the loss, hence the incoming
    gradient, is the same on every rank of the group (see the module docstring).
    """
    from .logps import _token_logps

    V.check_logits_labels(logits, labels, shift=shift)
    vocab_start, vocab_total, shards = _shard_setup(
        labels, process_group, logits.shape[-1], ignore_index, validate, logits.device,
        return_entropy)
    return _token_logps(logits, labels, ignore_index=ignore_index, temperature=temperature,
                        shift=shift, return_entropy=return_entropy,
                        inplace_backward=inplace_backward, backend=backend, validate=validate,
                        vocab_start=vocab_start, vocab_total=vocab_total, shards=shards)


def vocab_parallel_linear_token_logps(hidden, weight_shard, labels, process_group, *, bias=None,
                                      ignore_index=-100, temperature=1.0, logit_scale=1.0,
                                      softcap=None, shift=False, return_entropy=False,
                                      backend="auto", validate=None, deterministic=False):
    """:func:`fastdpo.linear.linear_token_logps` with the LM-head rows sharded over the group.

    ``hidden``: ``(B, T, H)`` or ``(N, H)``, the same on every rank; ``weight_shard``: this rank's
    ``(V/W, H)`` rows (ids ``[r*V/W, (r+1)*V/W)``), ``bias`` its ``(V/W,)`` slice or None; labels
    are global ids shaped like ``hidden.shape[:-1]``. Returns log-probs shaped like the labels
    (``labels[..., 1:]`` with ``shift``), identical on every rank. Backward sums ``d hidden`` over
    the group (one all-reduce) and keeps ``d weight`` / ``d bias`` local; like the logits path it
    assumes the incoming gradient is the same on every rank.
    """
    from .linear import _check, _linear_token_logps

    _check(hidden, weight_shard, labels, bias, shift, temperature, logit_scale, softcap)
    vocab_start, vocab_total, shards = _shard_setup(
        labels, process_group, weight_shard.shape[0], ignore_index, validate, hidden.device,
        return_entropy)
    return _linear_token_logps(hidden, weight_shard, labels, bias=bias, ignore_index=ignore_index,
                               temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                               shift=shift, return_entropy=return_entropy, backend=backend,
                               validate=validate, deterministic=deterministic,
                               vocab_start=vocab_start, vocab_total=vocab_total, shards=shards)
