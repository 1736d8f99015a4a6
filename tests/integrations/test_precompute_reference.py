"""Precomputed reference log-probs: FastDPOTrainer(precompute_ref_log_probs=True) on the fused head,
and fastdpo.precompute_reference for custom loops (tiny random Llama, CPU, fp32, no downloads)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import peers

peers.require("trl", "datasets")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

# the tiny tokenizer / Llama / dataset of the DPO trainer tests (fixtures are used by name)
from test_trl import (TRL_METRICS, assert_logs_close, dataset, one_thread,  # noqa: E402,F401
                      tiny_llama, tokenizer)

import fastdpo  # noqa: E402
import fastdpo.reference  # noqa: E402
from fastdpo.integrations.reference import (COLUMNS, ReferenceLogps,  # noqa: E402
                                             precompute_reference)
from fastdpo.integrations.trl import FastDPOConfig, FastDPOTrainer  # noqa: E402

EVAL_METRICS = ["eval_loss"] + ["eval_" + k for k in TRL_METRICS
                                if k not in ("loss", "grad_norm", "num_tokens")]


def build(cls, tokenizer, data, *, with_ref=True, ref_seed=None, eval_data=None,
          peft_config=None, steps=3, **cfg):
    """A trainer on tiny_llama(seed 0); the reference is a copy of it, or (ref_seed) another
    random model, so that a policy/reference mix-up changes the numbers from the first step."""
    model = tiny_llama(tokenizer)
    ref = None
    if with_ref:
        ref = copy.deepcopy(model) if ref_seed is None else tiny_llama(tokenizer, seed=ref_seed)
    config_cls = FastDPOConfig if cls is FastDPOTrainer else DPOConfig
    cfg.setdefault("output_dir", "/tmp/fastdpo-test-precompute")
    cfg.setdefault("save_strategy", "no")
    args = config_cls(max_steps=steps, per_device_train_batch_size=2, per_device_eval_batch_size=3,
                      logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                      learning_rate=1e-2, seed=0, bf16=False, **cfg)
    return cls(model=model, ref_model=ref, args=args, train_dataset=data, eval_dataset=eval_data,
               processing_class=tokenizer, peft_config=peft_config)


def train_log(trainer, **kw):
    trainer.train(**kw)
    return [h for h in trainer.state.log_history if "loss" in h]


def columns(ds):
    return tuple(torch.tensor(ds[c], dtype=torch.float64) for c in COLUMNS)


def oracle(model, ds):
    """float64 reference log-probs of each tokenised example from the model's full logits."""
    out = ([], [])
    with torch.no_grad():
        for ex in ds:
            for side, key in enumerate(("chosen_ids", "rejected_ids")):
                ids = torch.tensor([ex["prompt_ids"] + ex[key]])
                labels = ids.clone()
                labels[:, :len(ex["prompt_ids"])] = -100
                logits = model(input_ids=ids).logits.double()
                out[side].append(fastdpo.reference.sequence_logps(logits, labels, shift=True))
    return tuple(torch.cat(o) for o in out)


class Calls:
    """Counts the calls of ``owner.name`` (wrapping it) while in use."""

    def __init__(self, monkeypatch, owner, name):
        self.n, fn = 0, getattr(owner, name)

        def wrapped(*a, **k):
            self.n += 1
            return fn(*a, **k)
        monkeypatch.setattr(owner, name, wrapped)


# ------------------------------------------------------------------ FastDPOTrainer


@pytest.mark.parametrize("cfg", [{}, {"loss_type": ["ipo"]}], ids=["sigmoid", "ipo"])
def test_training_with_precomputed_reference_equals_on_the_fly(tokenizer, cfg):
    runs = {}
    for pre in (False, True):
        tr = build(FastDPOTrainer, tokenizer, dataset("none"), eval_data=dataset("none"),
                   precompute_ref_log_probs=pre, fastdpo_backend="torch", ref_seed=1, **cfg)
        assert tr.precompute_ref_logps is pre
        assert all(c in tr.train_dataset.column_names for c in COLUMNS) is pre
        assert all(c in tr.eval_dataset.column_names for c in COLUMNS) is pre
        runs[pre] = train_log(tr), tr.evaluate()
    assert_logs_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-7)
    assert_logs_close([runs[True][1]], [runs[False][1]], names=EVAL_METRICS, rtol=1e-5, atol=1e-7)


def test_columns_equal_on_the_fly_trl_and_the_logits(tokenizer):
    kw = dict(precompute_ref_log_probs=True, ref_seed=1)  # the reference is not the policy
    fast = build(FastDPOTrainer, tokenizer, dataset("none"), fastdpo_backend="torch", **kw)
    trl_tr = build(DPOTrainer, tokenizer, dataset("none"), **kw)
    ours = columns(fast.train_dataset)
    for other in (columns(trl_tr.train_dataset),
                  oracle(tiny_llama(tokenizer, seed=1), fast.train_dataset)):
        for a, b in zip(ours, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # full fine-tuning without ref_model: the policy before training is the reference
    no_ref = build(FastDPOTrainer, tokenizer, dataset("none"), precompute_ref_log_probs=True,
                   with_ref=False)
    assert no_ref.ref_model is None
    policy = oracle(tiny_llama(tokenizer), fast.train_dataset)
    for a, b in zip(columns(no_ref.train_dataset), policy):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the on-the-fly reference of the training step, on other padded batches (3 pairs)
    live = build(FastDPOTrainer, tokenizer, dataset("none"), fastdpo_backend="torch", ref_seed=1)
    examples = list(live.train_dataset)
    for i in range(0, len(examples), 3):
        batch = live.data_collator(examples[i:i + 3])
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kw = {k: batch[k] for k in ("input_ids", "attention_mask")}
        c, r = live._reference_logps(live.ref_model, batch, dict(kw, use_cache=False), labels)
        torch.testing.assert_close(c.double(), ours[0][i:i + 3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.double(), ours[1][i:i + 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_ref", [True, False], ids=["ref_model", "no-ref_model"])
def test_precompute_pass_is_fused_and_no_grad(tokenizer, monkeypatch, with_ref):
    """No LM head forward (no logits at all), the decoder under no_grad once per batch, and
    TRL's own (unfused) compute_ref_log_probs never called."""
    theirs = Calls(monkeypatch, DPOTrainer, "compute_ref_log_probs")
    model = tiny_llama(tokenizer)
    ref = copy.deepcopy(model)
    head_calls, decoder_grad = [], []
    for m in (model, ref):
        m.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
        m.model.register_forward_pre_hook(
            lambda *a: decoder_grad.append(torch.is_grad_enabled()))
    args = FastDPOConfig(output_dir="/tmp/fastdpo-test-precompute", max_steps=1, report_to=[],
                         per_device_train_batch_size=2, use_cpu=True, save_strategy="no",
                         precompute_ref_log_probs=True, bf16=False)
    FastDPOTrainer(model=model, ref_model=ref if with_ref else None, args=args,
                   train_dataset=dataset("none"), processing_class=tokenizer)
    assert theirs.n == 0
    assert head_calls == []
    assert decoder_grad == [False] * 4  # 8 pairs, 2 a batch


def test_dataset_with_columns_is_not_recomputed_and_resume_matches(tokenizer, monkeypatch,
                                                                    tmp_path):
    first = build(FastDPOTrainer, tokenizer, dataset("none"), precompute_ref_log_probs=True,
                  steps=2, output_dir=str(tmp_path), save_strategy="steps", save_steps=1)
    full = train_log(first)
    stored = first.train_dataset
    ours = Calls(monkeypatch, FastDPOTrainer, "compute_ref_log_probs")
    again = build(FastDPOTrainer, tokenizer, stored, precompute_ref_log_probs=True, steps=2,
                  output_dir=str(tmp_path), save_strategy="steps", save_steps=1)
    assert ours.n == 0  # loaded, not recomputed
    for a, b in zip(columns(again.train_dataset), columns(stored)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    resumed = train_log(again, resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert [h["step"] for h in resumed] == [1, 2]  # step 1's log comes from the checkpoint
    # (TRL's num_tokens counter is not in the checkpoint: it restarts at the resumed step)
    names = [k for k in TRL_METRICS if k != "num_tokens"]
    assert_logs_close(resumed, full, names, rtol=1e-5, atol=1e-7)
    # a fresh trainer on the raw dataset recomputes, to the same values
    fresh = build(FastDPOTrainer, tokenizer, dataset("none"), precompute_ref_log_probs=True)
    assert ours.n == 4
    for a, b in zip(columns(fresh.train_dataset), columns(stored)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stored_columns_are_checked(tokenizer):
    ds = build(FastDPOTrainer, tokenizer, dataset("none"),
               precompute_ref_log_probs=True).train_dataset
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        build(FastDPOTrainer, tokenizer, ds.remove_columns(["ref_rejected_logps"]),
              precompute_ref_log_probs=True)
    nan = ds.map(lambda ex, i: {"ref_chosen_logps": math.nan if i == 3 else
                                ex["ref_chosen_logps"]}, with_indices=True)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        build(FastDPOTrainer, tokenizer, nan, precompute_ref_log_probs=True)


def test_peft_reference_is_the_adapter_disabled_model(tokenizer):
    """With PEFT and no ref_model the precompute pass disables the adapter (TRL's use_adapter),
    also when the adapter is not a no-op at the start (a loaded or non-zero-initialised one)."""
    peers.require("peft")
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)  # B != 0: the adapter changes the outputs
    kw = dict(with_ref=False, precompute_ref_log_probs=True)
    fast = build(FastDPOTrainer, tokenizer, dataset("none"), peft_config=lora(), **kw)
    theirs = build(DPOTrainer, tokenizer, dataset("none"), peft_config=lora(), **kw)
    base = oracle(tiny_llama(tokenizer), fast.train_dataset)
    ours = columns(fast.train_dataset)
    for a, b, c in zip(ours, columns(theirs.train_dataset), base):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)
    adapted = oracle(fast.model, fast.train_dataset)
    assert (adapted[0] - base[0]).abs().max() > 1e-2  # the adapter matters: the test can fail
    # a custom loop: precompute_reference under the adapter-disabled PEFT model
    with fast.model.disable_adapter():
        custom = precompute_reference(fast.model, fast.train_dataset, batch_size=3)
    torch.testing.assert_close(custom.chosen.double(), base[0], rtol=1e-5, atol=1e-5)
    with_adapter = precompute_reference(fast.model, fast.train_dataset, batch_size=3)
    torch.testing.assert_close(with_adapter.rejected.double(), adapted[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ precompute_reference


def tokenised():
    """A few pairs in the documented format (one with an empty prompt)."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(4, 36, (n,), generator=g).tolist()
    lens = [(5, 3, 4), (0, 4, 2), (7, 1, 6), (2, 5, 5), (3, 2, 1)]
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
            for p, c, r in lens]


def hidden_state_logps(model, examples):
    """linear_sequence_logps of each example's own (unpadded) final hidden states."""
    out = ([], [])
    with torch.no_grad():
        for ex in examples:
            for side, key in enumerate(("chosen_ids", "rejected_ids")):
                ids = torch.tensor([list(ex["prompt_ids"]) + list(ex[key])])
                labels = ids.clone()
                labels[:, :len(ex["prompt_ids"])] = -100
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
                out[side].append(fastdpo.linear_sequence_logps(
                    hidden, model.lm_head.weight, labels, shift=True, backend="torch"))
    return tuple(torch.cat(o) for o in out)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_precompute_reference_matches_hidden_states(tokenizer, batch_size):
    model = tiny_llama(tokenizer)
    examples = tokenised()
    expect = hidden_state_logps(model, examples)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    model.train()
    ref = precompute_reference(model, examples, batch_size=batch_size, backend="torch")
    assert head_calls == [] and model.training and model.model.layers[0].training
    assert isinstance(ref, ReferenceLogps) and ref.chosen.shape == ref.rejected.shape == (5,)
    assert not ref.chosen.requires_grad and ref.chosen.dtype == torch.float32
    torch.testing.assert_close(ref.chosen, expect[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.rejected, expect[1], rtol=1e-5, atol=1e-5)
    # tensors, a datasets.Dataset and a generator are the same examples
    as_tensors = [{k: torch.tensor(v) for k, v in ex.items()} for ex in examples]
    for same in (as_tensors, Dataset.from_list(examples), (ex for ex in examples)):
        other = precompute_reference(model, same, batch_size=batch_size, backend="torch")
        torch.testing.assert_close(other.chosen, ref.chosen, rtol=1e-6, atol=1e-6)
    assert precompute_reference(model, [], backend="torch").chosen.shape == (0,)


def test_precompute_reference_feeds_the_trainer(tokenizer, monkeypatch):
    """Columns added by precompute_reference are what the trainer would compute: it loads them
    instead of recomputing and trains the same."""
    trained = build(FastDPOTrainer, tokenizer, dataset("none"), precompute_ref_log_probs=True,
                    ref_seed=1)
    tokenised_ds = trained.train_dataset.remove_columns(list(COLUMNS))
    ref = precompute_reference(tiny_llama(tokenizer, seed=1), tokenised_ds, batch_size=3)
    with_cols = ref.add_to(tokenised_ds)
    for a, b in zip(columns(with_cols), columns(trained.train_dataset)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ours = Calls(monkeypatch, FastDPOTrainer, "compute_ref_log_probs")
    loaded = build(FastDPOTrainer, tokenizer, with_cols, precompute_ref_log_probs=True,
                   ref_seed=1)
    assert ours.n == 0
    # other batches than the trainer's (3, not 2): the sums of ~-30 differ in the last fp32 bit,
    # beta * ulp(32) ~ 4e-7 in the rewards
    assert_logs_close(train_log(loaded), train_log(trained), rtol=1e-5, atol=1e-6)


def test_precompute_reference_bad_arguments(tokenizer):
    model = tiny_llama(tokenizer)
    good = tokenised()[:2]
    V = model.config.vocab_size
    cases = [
        (dict(model="llama"), TypeError, "model"),
        (dict(model=torch.nn.Linear(2, 2)), TypeError, "decoder"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=True), TypeError, "batch_size"),
        (dict(batch_size=2.0), TypeError, "batch_size"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(examples=good[0]), TypeError, "examples"),
        (dict(examples="abc"), TypeError, "examples"),
        (dict(examples=[good[0], [1, 2, 3]]), TypeError, "example 1"),
        (dict(examples=[{"prompt_ids": [1], "chosen_ids": [2]}]), ValueError, "rejected_ids"),
        (dict(examples=[dict(good[0], chosen_ids=[])]), ValueError, "chosen_ids"),
        (dict(examples=[dict(good[0], prompt_ids=[0.5, 1.0])]), TypeError, "prompt_ids"),
        (dict(examples=[dict(good[0], rejected_ids=[1, V])]), ValueError, "rejected_ids"),
        (dict(examples=[dict(good[0], rejected_ids=[-1])]), ValueError, "rejected_ids"),
        (dict(examples=[dict(good[0], chosen_ids=torch.ones(2, 2, dtype=torch.long))]),
         ValueError, "chosen_ids"),
    ]
    for kw, exc, name in cases:
        args = dict(model=model, examples=good)
        args.update(kw)
        with pytest.raises(exc, match=name):
            precompute_reference(args.pop("model"), args.pop("examples"), **args)
    ref = precompute_reference(model, good, backend="torch")
    with pytest.raises(TypeError, match="dataset"):
        ref.add_to(good)
    with pytest.raises(ValueError, match="dataset"):
        ref.add_to(Dataset.from_list(tokenised()))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        ref.add_to(ref.add_to(Dataset.from_list(good)))


def test_top_level_export():
    assert fastdpo.precompute_reference is precompute_reference
    assert "precompute_reference" in fastdpo.__all__


def test_evaluate_after_training_loads_stored_columns(tokenizer):
    """Full fine-tuning without ref_model: after a step the reference is gone, so TRL refuses a
    dataset given to evaluate(); one that carries the reference columns needs no reference and
    evaluates as the eval_dataset given at init does (a dict of them too)."""
    tr = build(FastDPOTrainer, tokenizer, dataset("none"), eval_data=dataset("none"),
               with_ref=False, precompute_ref_log_probs=True, steps=1)
    train_log(tr)
    assert tr.state.global_step == 1 and tr.ref_model is None
    expect = tr.evaluate()
    stored = tr.eval_dataset
    raw = dataset("none")  # untokenised, with the columns: evaluate() tokenises it
    for c in COLUMNS:
        raw = raw.add_column(c, stored[c])
    for ds in (stored, raw):
        got = tr.evaluate(eval_dataset=ds)
        assert_logs_close([got], [expect], names=EVAL_METRICS, rtol=1e-6, atol=1e-8)
    split = tr.evaluate(eval_dataset={"held": raw})
    assert_logs_close([{k.replace("eval_held_", "eval_"): v for k, v in split.items()}],
                      [expect], names=EVAL_METRICS, rtol=1e-6, atol=1e-8)
    # without the columns there is no reference to compute them with: TRL's refusal stands
    with pytest.raises(ValueError, match="reference log-probs"):
        tr.evaluate(eval_dataset=dataset("none"))


def test_stored_columns_in_any_dataset_format():
    """TRL stores the columns as float32: read in the numpy, torch or arrow format, they are
    still one finite number per example; a wrong column is refused in every format."""
    from fastdpo.integrations.reference import has_reference_columns
    base = {k: [[1, 2], [3]] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    good = Dataset.from_dict({**base, COLUMNS[0]: [-1.5, -2.0], COLUMNS[1]: [-3.0, -4.25]})
    good = good.cast_column(COLUMNS[0], datasets_value("float32"))
    bad = {TypeError: [[True, False], [[-1.0], [-2.0]], ["a", "b"]],
           ValueError: [[-1.0, math.nan], [-math.inf, -1.0]]}
    for fmt in (None, "numpy", "torch", "arrow", "pandas", "python"):
        assert has_reference_columns(good.with_format(fmt)), fmt
        for exc, columns_ in bad.items():
            for col in columns_:
                ds = Dataset.from_dict({**base, COLUMNS[0]: col, COLUMNS[1]: [-1.0, -2.0]})
                with pytest.raises(exc, match=COLUMNS[0]):
                    has_reference_columns(ds.with_format(fmt))
    assert not has_reference_columns(Dataset.from_dict(base).with_format("torch"))
    # a streaming dataset is not read through (it may be huge or endless): TRL's own refusal
    # of precompute_ref_log_probs with an IterableDataset stands
    stream = good.to_iterable_dataset()
    assert set(COLUMNS) <= set(stream.column_names)
    assert not has_reference_columns(stream)


def datasets_value(dtype):
    from datasets import Value
    return Value(dtype)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_precompute_reference_truncates_as_the_trainer(tokenizer, mode):
    """The trainer's collator cuts prompt + completion to max_length (TRL's default is 1024):
    precompute_reference(max_length=, truncation_mode=) scores the same tokens, so its columns
    are the ones the trainer would compute; without the cut they cover other tokens."""
    cut = dict(max_length=14, truncation_mode=mode)
    trained = build(FastDPOTrainer, tokenizer, dataset("none"), precompute_ref_log_probs=True,
                    ref_seed=1, **cut)
    ds = trained.train_dataset.remove_columns(list(COLUMNS))
    lens = [len(p) + max(len(c), len(r))
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    assert max(lens) > 14  # the cut applies
    ref_model = tiny_llama(tokenizer, seed=1)
    ref = precompute_reference(ref_model, ds, batch_size=3, **cut)
    for a, b in zip((ref.chosen.double(), ref.rejected.double()), columns(trained.train_dataset)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    full = precompute_reference(ref_model, ds, batch_size=3)
    assert (full.chosen - ref.chosen).abs().max() > 1e-3
    for kw, exc in ((dict(max_length=0), ValueError), (dict(max_length=2.0), TypeError),
                    (dict(truncation_mode="middle"), ValueError)):
        with pytest.raises(exc, match=next(iter(kw))):
            precompute_reference(ref_model, ds, **kw)
