"""Soft-label DPO with a reward-model ensemble, end to end on a laptop CPU (under a minute).

1. A hidden "true" preference: completions with more friendly words and fewer rude ones are better.
2. Three tiny reward models (random-init Llama sequence classifiers) are fitted with the
   Bradley-Terry loss on *noisy* labels of that preference, each on its own bootstrap sample, so
   they disagree where the evidence is thin.
3. A preference dataset whose chosen/rejected labels are themselves noisy gets a reward column per
   model (``chosen_reward`` / ``rejected_reward`` hold a list of three scores per example).
4. ``FastDPOTrainer`` trains a tiny policy with ``loss_type="soft"``: each pair's target is the
   ensemble's P(chosen beats rejected) (``fastdpo.preference_probs``, ``mean_prob``), so pairs the
   reward models doubt, or reverse, push the policy less, or the other way.

Run: ``python examples/soft_label_dpo.py [--steps 20] [--rm-steps 40] [--members 3]``.
Everything is built from configs in this file: no downloads.
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          PreTrainedTokenizerFast)

import fastdpo
from fastdpo.integrations.trl import FastDPOConfig, FastDPOTrainer

FRIENDLY = ["thanks", "please", "great", "kind", "glad"]
RUDE = ["no", "bad", "ugh", "meh", "go"]
PROMPTS = ["reply to bob:", "answer ann:", "write to sam:", "tell joe:", "respond:"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in "abcdefghijklmnopqrstuvwxyz .,:!?":
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def llama_config(tok, layers=2, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                       tie_word_embeddings=False, **kw)


def true_score(text: str) -> int:
    words = text.split()
    return sum(w in FRIENDLY for w in words) - sum(w in RUDE for w in words)


def completion(rng: random.Random) -> str:
    return " " + " ".join(rng.choice(FRIENDLY + RUDE) for _ in range(3))


def noisy_pairs(rng: random.Random, n: int, flip: float):
    """(prompt, chosen, rejected) by the true score, each label flipped with probability flip."""
    out = []
    while len(out) < n:
        p, a, b = rng.choice(PROMPTS), completion(rng), completion(rng)
        if true_score(a) == true_score(b):
            continue
        if (true_score(a) < true_score(b)) != (rng.random() < flip):
            a, b = b, a
        out.append((p, a, b))
    return out


def encode(tok, texts):
    enc = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def fit_reward_model(tok, pairs, seed: int, steps: int) -> LlamaForSequenceClassification:
    """Bradley-Terry fit: maximise log sigmoid(r(prompt+chosen) - r(prompt+rejected))."""
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(llama_config(tok, layers=1, num_labels=1))
    rng = random.Random(seed)
    boot = [rng.choice(pairs) for _ in pairs]  # each member sees its own bootstrap sample
    ids_c, m_c = encode(tok, [p + c for p, c, _ in boot])
    ids_r, m_r = encode(tok, [p + r for p, _, r in boot])
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    for _ in range(steps):
        rc = rm(input_ids=ids_c, attention_mask=m_c).logits.squeeze(-1)
        rr = rm(input_ids=ids_r, attention_mask=m_r).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(rc - rr).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rm.eval()


@torch.no_grad()
def score(tok, rms, texts):
    """(E, N) rewards of texts under each reward model."""
    ids, mask = encode(tok, texts)
    return torch.stack([rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1) for rm in rms])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="DPO training steps")
    ap.add_argument("--rm-steps", type=int, default=40, help="steps per reward model")
    ap.add_argument("--members", type=int, default=3, help="reward models in the ensemble")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (tiny models: more threads mostly add overhead)")
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = char_tokenizer()
    rng = random.Random(0)

    rm_pairs = noisy_pairs(rng, 128, flip=0.2)
    rms = [fit_reward_model(tok, rm_pairs, seed=s, steps=args.rm_steps)
           for s in range(args.members)]

    pairs = noisy_pairs(rng, 32, flip=0.25)
    rc = score(tok, rms, [p + c for p, c, _ in pairs])  # (E, N)
    rr = score(tok, rms, [p + r for p, _, r in pairs])
    targets = fastdpo.preference_probs(rc, rr)
    agree = ((targets.probs > 0.5) == torch.tensor(
        [true_score(c) > true_score(r) for _, c, r in pairs])).float().mean()
    print(f"reward ensemble of {args.members}: mean P(chosen wins) = "
          f"{targets.probs.mean():.3f}; agrees with the true preference on {agree:.0%} of "
          f"the pairs (the dataset labels themselves are 75% right)")
    data = Dataset.from_dict({
        "prompt": [p for p, _, _ in pairs],
        "chosen": [c for _, c, _ in pairs],
        "rejected": [r for _, _, r in pairs],
        "chosen_reward": rc.t().tolist(),  # one list of E member scores per example
        "rejected_reward": rr.t().tolist(),
    })

    torch.manual_seed(0)
    policy = LlamaForCausalLM(llama_config(tok))
    config = FastDPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="fastdpo-soft-"),
        loss_type=["soft"], beta=0.1, reward_ensemble="mean_prob",
        max_steps=args.steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=max(1, args.steps // 6), report_to=[], use_cpu=True, bf16=False,
        save_strategy="no", disable_tqdm=True, seed=0)
    trainer = FastDPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=config,
                             train_dataset=data, processing_class=tok)
    trainer.train()
    keys = ("loss", "rewards/accuracies", "rewards/margins", "targets/probs", "entropy")
    for h in trainer.state.log_history:
        if "loss" in h:
            print(f"step {h['step']:>3}: " + "  ".join(f"{k} {h[k]:.4f}" for k in keys if k in h))
    return trainer


if __name__ == "__main__":
    main()
