"""The TRL training step (``fastdpo bench --preset trl-step``).

One ``compute_loss`` + ``backward`` of a DPO batch on a small random Llama whose vocabulary is
large (the LM head dominates, as in real DPO on 128k-256k vocabularies), for:

* ``FastDPOTrainer``: a trainable head's route, the policy's head pass and the loss in one
  ``linear_dpo_loss`` call (3 head matmuls) and the reference from ``linear_pair_logps``; TRL's
  token metrics from that pass's own row statistics (``token_stats=True``);
* ``FastDPOTrainer[metrics pass]``: the same, the token metrics from a fused no-grad head pass
  of their own (one matmul more: the trainer before `token_stats`);
* ``FastDPOTrainer[log-prob pass]``: the same trainer made to take its other route (the fused
  log-prob pass, recomputing the logits in backward: 4 head matmuls, then ``dpo_loss``), which
  is what it ran before the fused loss and still runs for a frozen head;
* ``FastDPOTrainer[log-prob pass, tiled metrics]``: that route with TRL's token metrics from
  the tiled eager pass (``trl_metrics.logit_stats``) instead of one fused no-grad pass: the
  trainer as it was before both changes (0.2.0 and earlier);
* ``trl.DPOTrainer``: TRL's own step (its chunked fused LM head on CPU).

Every trainer has the same model weights (the reference a seeded perturbation of the policy),
batch and metrics settings (TRL's defaults: entropy and token metrics logged), so their losses
must agree. Repeats are interleaved, the order rotating, and the median kept, so
the machine's drift hits every row alike. No data or model is downloaded: a one-character
tokenizer and a config-built model.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report
from .machine import machine_info, machine_tag


@dataclass(frozen=True)
class TrainerCase:
    pairs: int          # preference pairs per batch
    prompt_chars: int   # one token per character
    completion_chars: int
    hidden: int
    vocab: int
    layers: int = 2

    def label(self) -> str:
        return (f"pairs={self.pairs} T~{self.prompt_chars + self.completion_chars} "
                f"H={self.hidden} V={self.vocab}")


CASES = (TrainerCase(2, 64, 192, 256, 32000), TrainerCase(2, 64, 192, 256, 128256))
TINY = (TrainerCase(1, 6, 10, 16, 300, layers=1),)  # the tests' size
IMPLS = ("FastDPOTrainer", "FastDPOTrainer[metrics pass]", "FastDPOTrainer[log-prob pass]",
         "FastDPOTrainer[log-prob pass, tiled metrics]", "trl.DPOTrainer")
TILED = "FastDPOTrainer[log-prob pass, tiled metrics]"
CHARS = "abcdefghijklmnopqrstuvwxyz .,?!:"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def _text(n: int, g: torch.Generator) -> str:
    idx = torch.randint(0, len(CHARS), (n,), generator=g)
    return "".join(CHARS[i] for i in idx.tolist())


def _dataset(case: TrainerCase):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    n = case.pairs
    return Dataset.from_dict({"prompt": [_text(case.prompt_chars, g) for _ in range(n)],
                              "chosen": [_text(case.completion_chars, g) for _ in range(n)],
                              "rejected": [_text(case.completion_chars, g) for _ in range(n)]})


def _model(case: TrainerCase):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden,
                      intermediate_size=2 * case.hidden, num_hidden_layers=case.layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _reference(model):
    """A copy of the policy with seeded noise on every weight: the loss then depends on both
    models (an exact copy makes every trainer's loss log 2, whatever its route computes)."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return ref


def build(impl: str, case: TrainerCase, out_dir: str):
    """``(trainer, batch)`` for ``impl``: the trainer in train mode and one prepared batch."""
    from trl import DPOConfig, DPOTrainer

    from ..integrations.trl import FastDPOConfig, FastDPOTrainer

    fast = impl.startswith("FastDPOTrainer")
    model = _model(case)
    args = (FastDPOConfig if fast else DPOConfig)(
        output_dir=out_dir, max_steps=1, per_device_train_batch_size=case.pairs, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, seed=0)
    cls = FastDPOTrainer if fast else DPOTrainer
    tr = cls(model=model, ref_model=_reference(model), args=args,
             train_dataset=_dataset(case), processing_class=_tokenizer())
    if impl.startswith("FastDPOTrainer[log-prob pass"):
        tr._fused_loss = lambda: False  # the other route of the same trainer
    if impl == "FastDPOTrainer[metrics pass]":
        tr._metrics_in_pass = lambda dec: False  # the token metrics from a head pass of their own
    tr.model.train()
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    return tr, batch


@contextlib.contextmanager
def _tiled_metrics():
    """The trainer's token metrics from the tiled eager pass, for the duration of a step."""
    from ..integrations import trl as trl_mod
    from ..integrations.trl_metrics import logit_stats

    fused = trl_mod.token_stats
    trl_mod.token_stats = lambda *a, backend=None, **k: logit_stats(*a, **k)
    try:
        yield
    finally:
        trl_mod.token_stats = fused


def step(tr, batch, impl: str = "") -> float:
    """One ``compute_loss`` + ``backward``; returns the loss."""
    with _tiled_metrics() if impl == TILED else contextlib.nullcontext():
        tr.model.zero_grad(set_to_none=True)
        loss = tr.compute_loss(tr.model, batch)
        loss.backward()
    return loss.detach().item()


def _timed(tr, batch, impl) -> float:
    t0 = time.perf_counter()
    step(tr, batch, impl)
    return time.perf_counter() - t0


def run_case(case: TrainerCase, impls=IMPLS, *, repeats: int = 5, out_dir: str,
             log=print) -> list[dict]:
    """One row per implementation: interleaved repeats (order rotating), median and samples, the
    step's loss (the same batch and weights for every trainer)."""
    built = {name: build(name, case, out_dir) for name in impls}
    losses = {name: step(*built[name], name) for name in impls}  # warm-up (allocations)
    samples = {name: [] for name in impls}
    names = list(impls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_timed(*built[name], name))
        log(f"  {case.label()} repeat {r + 1}/{repeats}: " +
            ", ".join(f"{n} {samples[n][-1] * 1e3:.0f} ms" for n in names))
    _, batch = built[names[0]]
    tokens = int(batch["attention_mask"].sum())
    base = {"pairs": case.pairs, "hidden": case.hidden, "vocab": case.vocab,
            "layers": case.layers, "tokens": tokens,
            "completion_tokens": int(batch["completion_mask"][:, 1:].sum()),
            "seq_len": int(batch["input_ids"].shape[1])}
    ref = statistics.median(samples[names[0]])
    return [{**base, "impl": n, "repeats": repeats, "samples_s": samples[n],
             "median_s": statistics.median(samples[n]), "loss": losses[n],
             "vs_first": statistics.median(samples[n]) / ref, "first": names[0]}
            for n in names]


def table(rows: list[dict]) -> str:
    """Per case and trainer: the median step, as a multiple of the case's first row, the loss."""
    lines = [f"{'case':38s} {'impl':46s} {'median':>9s} {'x first':>8s} {'loss':>9s}"]
    for r in rows:
        case = f"pairs={r['pairs']} T={r['seq_len']} H={r['hidden']} V={r['vocab']}"
        lines.append(f"{case:38s} {r['impl']:46s} {r['median_s'] * 1e3:7.0f}ms "
                     f"{r['vs_first']:7.2f}x {r['loss']:9.5f}")
    return "\n".join(lines)


def trainer_job(out: Path, *, cases=CASES, impls=IMPLS, repeats: int = 7, log=print) -> dict:
    """``fastdpo bench --preset trl-step``: JSON, CSV and the table under ``out``."""
    import tempfile

    machine = machine_info()
    log(f"fastdpo bench --preset trl-step on {report.machine_line(machine)}: {len(cases)} cases")
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            rows += run_case(case, impls, repeats=repeats, out_dir=tmp, log=log)
    text = table(rows)
    log("\n" + text)
    tag, ts = machine_tag(machine), report.stamp(machine)
    obj = {"kind": "trl-step", "machine": machine, "device": "cpu",
           "method": {"step": "trainer.compute_loss(model, batch) + backward, one prepared "
                              "batch, fp32, the trainers' default metrics",
                      "repeats": f"{repeats} interleaved (order rotated), after one warm-up "
                                 "step each; median"},
           "rows": rows, "elapsed_s": time.perf_counter() - t0}
    files = report.write_json(obj, out, "trl-step", tag, ts)
    files += report.write_csv(rows, machine, out, "trl-step", tag, ts)
    files += report.write_text(text, out, "trl-step-table", tag, ts)
    log("\nwrote " + ", ".join(str(f) for f in files))
    return obj
