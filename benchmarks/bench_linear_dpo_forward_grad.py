"""DPO through the LM head with the gradient formed in forward (``linear_dpo_loss``), against the
bare matmuls of the same shapes measured in the same run, the previous fused path and eager.

    python benchmarks/bench_linear_dpo_forward_grad.py [--n 1024 --h 512 --v 32000] [--repeats 3]

Every variant runs once per round, rounds interleaved, and the minimum over rounds is reported
(a shared machine inflates the others). Rows are fully labelled (no prompt), so the matmul floor is
``rows x H x V`` per GEMM: the DPO step (reference + policy forward and backward) is 4 GEMMs, the
frozen-head policy pass 2. On a shared machine prefer ``--threads 1``: with every core busy, a
multi-threaded run mostly measures how long each parallel region waits for a descheduled thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastdpo import reference as R
from fastdpo.linear import linear_sequence_logps, linear_token_logps
from fastdpo.losses.fused_linear import linear_dpo_loss
from fastdpo.losses import dpo_loss


def make(n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = 128 if n >= 256 else n // 2
    B = max(1, n // (2 * T))
    hidden = torch.randn(2 * B, T, h, generator=g)
    weight = torch.randn(v, h, generator=g) * h ** -0.5
    labels = torch.randint(0, v, (2 * B, T), generator=g)
    ref_hidden = hidden + 0.01 * torch.randn(hidden.shape, generator=g)
    return hidden, weight, labels, ref_hidden


def variants(hidden, weight, labels, ref_hidden, backend):
    n, hdim = hidden.shape[0] * (hidden.shape[1] - 1), hidden.shape[-1]
    h2 = hidden.reshape(-1, hdim)[:n]
    logits_buf = torch.empty(n, weight.shape[0])
    B = hidden.shape[0] // 2
    leaf_h, leaf_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def leaves(weight_grad=True):  # fresh gradients each call, no copies timed
        leaf_h.grad = leaf_w.grad = None
        return leaf_h, (leaf_w if weight_grad else weight)

    def gemms4():
        torch.mm(h2, weight.t(), out=logits_buf)          # reference logits
        torch.mm(h2, weight.t(), out=logits_buf)          # policy logits
        torch.mm(logits_buf, weight)                      # d hidden
        torch.mm(logits_buf.t(), h2)                      # d weight

    def gemms2():
        torch.mm(h2, weight.t(), out=logits_buf)
        torch.mm(logits_buf, weight)

    def fused_grad_in_forward(batch_invariant=False):
        h, w = leaves()
        loss, _ = linear_dpo_loss(h, w, labels, ref_hidden=ref_hidden, ref_weight=weight,
                                  backend=backend, batch_invariant=batch_invariant)
        loss.backward()

    def previous_fused():
        h, w = leaves()
        pol = linear_sequence_logps(h, w, labels, shift=True, backend=backend)
        with torch.no_grad():
            ref = linear_sequence_logps(ref_hidden, weight, labels, shift=True, backend=backend)
        loss, _ = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:])
        loss.backward()

    def eager():
        h, w = leaves()
        pol = R.sequence_logps(h @ w.t(), labels, shift=True, dtype=torch.float32)
        with torch.no_grad():
            ref = R.sequence_logps(ref_hidden @ weight.t(), labels, shift=True,
                                   dtype=torch.float32)
        loss, _ = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:])
        loss.backward()

    rc = torch.zeros(B)

    def frozen_policy():
        h, _ = leaves(False)
        loss, _ = linear_dpo_loss(h, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rc,
                                  backend=backend)
        loss.backward()

    def frozen_token_logps():
        h, _ = leaves(False)
        linear_token_logps(h, weight, labels, shift=True, backend=backend).sum().backward()

    return {"4 GEMMs": gemms4, "fastdpo linear_dpo_loss": fused_grad_in_forward,
            "fastdpo linear_dpo_loss invariant": lambda: fused_grad_in_forward(True),
            "fastdpo previous fused": previous_fused, "eager": eager,
            "2 GEMMs": gemms2, "fastdpo frozen-head policy": frozen_policy,
            "fastdpo frozen-head token logps": frozen_token_logps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="rows (2B x T)")
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="process CPU time instead of wall time (with --threads 1: what a busy "
                         "machine's descheduling does not inflate)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    fns = variants(*make(a.n, a.h, a.v), a.backend)
    best = {k: float("inf") for k in fns}
    clock = time.process_time if a.cpu_time else time.perf_counter
    for _ in range(a.repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            best[k] = min(best[k], clock() - t0)
    print(f"N={a.n} H={a.h} V={a.v} threads={torch.get_num_threads()} backend={a.backend} "
          f"({'CPU' if a.cpu_time else 'wall'} time, min of {a.repeats} interleaved rounds)")
    for k, t in best.items():
        floor = best["2 GEMMs"] if ("frozen" in k or k == "2 GEMMs") else best["4 GEMMs"]
        print(f"  {k:32s} {t * 1e3:9.1f} ms  {t / floor:5.2f}x its GEMM floor")


if __name__ == "__main__":
    main()
