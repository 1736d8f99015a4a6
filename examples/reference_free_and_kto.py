"""SimPO, ORPO and KTO in a plain PyTorch training loop, straight from hidden states + LM head.

No trainer: each step runs the model's decoder, then ``fastdpo.CPOLoss`` / ``ORPOLoss`` /
``KTOLoss`` with ``hidden=..., weight=lm_head.weight``, so the ``(N, T, V)`` logits are never
formed (the fused LM head computes the log-probs tile by tile and forms its gradient in place).
KTO's reference and KL-baseline passes run without a graph.

The "preference": completions made of vowels are good, consonants bad. A tiny random-init Llama
learns it in a few dozen steps on a CPU.

Run: ``python examples/reference_free_and_kto.py [--loss simpo|orpo|kto] [--steps 30]``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastdpo

V, PROMPT, COMPLETION = 32, 4, 6
GOOD, BAD = torch.arange(1, 6), torch.arange(6, V)


def make_model(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def sequences(n, good: bool, g) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences: a random prompt, then a good or bad completion; labels mask the prompt."""
    pool = GOOD if good else BAD
    prompt = torch.randint(0, V, (n, PROMPT), generator=g)
    completion = pool[torch.randint(0, len(pool), (n, COMPLETION), generator=g)]
    ids = torch.cat([prompt, completion], 1)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, labels


def hidden_of(model, ids):
    return model.model(input_ids=ids).last_hidden_state


def step_loss(kind, policy, ref, crit, g, batch):
    if kind in ("simpo", "orpo"):  # pairs: [chosen; rejected]
        ids_w, lab_w = sequences(batch, True, g)
        ids_l, lab_l = sequences(batch, False, g)
        ids, labels = torch.cat([ids_w, ids_l]), torch.cat([lab_w, lab_l])
        return crit(hidden=hidden_of(policy, ids), weight=policy.lm_head.weight, labels=labels)
    # KTO: unpaired completions, half desirable; the KL batch pairs each prompt with the
    # next example's completion
    ids_w, lab_w = sequences(batch, True, g)
    ids_l, lab_l = sequences(batch, False, g)
    ids, labels = torch.cat([ids_w, ids_l]), torch.cat([lab_w, lab_l])
    desirable = torch.arange(2 * batch) < batch
    kl_ids = torch.cat([ids[:, :PROMPT], ids[:, PROMPT:].roll(1, 0)], 1)
    kl_labels = kl_ids.masked_fill(labels == -100, -100)
    with torch.no_grad():
        kl_pol = crit.sequences(kl_labels, hidden=hidden_of(policy, kl_ids),
                                weight=policy.lm_head.weight, policy=False)
        kl_ref = crit.sequences(kl_labels, hidden=hidden_of(ref, kl_ids),
                                weight=ref.lm_head.weight, policy=False)
        ref_hidden = hidden_of(ref, ids)
    return crit(hidden=hidden_of(policy, ids), weight=policy.lm_head.weight, labels=labels,
                desirable=desirable, ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight,
                policy_kl_logps=kl_pol, ref_kl_logps=kl_ref)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=["simpo", "orpo", "kto"], default="simpo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    policy = make_model()
    ref = copy.deepcopy(policy).requires_grad_(False)
    crit = {"simpo": lambda: fastdpo.CPOLoss(beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                                             cpo_alpha=0.0),
            "orpo": lambda: fastdpo.ORPOLoss(beta=0.5),
            "kto": lambda: fastdpo.KTOLoss(beta=0.5)}[a.loss]()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(a.steps):
        loss, metrics = step_loss(a.loss, policy, ref, crit, g, a.batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, a.steps // 5) == 0 or step == a.steps - 1:
            shown = {k: round(float(v), 4) for k, v in metrics.items()}
            print(f"step {step:3d}  loss {loss.item():.4f}  {shown}")
    return metrics


if __name__ == "__main__":
    main()
