"""LoRA (PEFT) through FastDPOTrainer against TRL's own DPOTrainer on a tiny random Llama (CPU).

Under LoRA the LM head is frozen: the fused head takes its frozen-head path (forward also forms
d logp / d hidden, backward only scales it: 2 matmuls for the policy pass), and the reference is
the same model with its adapter disabled (TRL's ``use_adapter``), never a second copy.
"""

from __future__ import annotations

import math

import pytest
import torch

import peers

peers.require("trl", "datasets", "peft")
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import fastdpo.reference  # noqa: E402
from fastdpo.integrations.trl import FastDPOConfig, FastDPOTrainer  # noqa: E402
from test_trl import one_thread, tokenizer  # noqa: E402,F401  (fixtures)
from matmul_count import MatmulFlops  # noqa: E402
from test_trl import TRL_METRICS, assert_logs_close, dataset, tiny_llama, train_log  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def lora_trainer(cls, tok, *, steps=3, **cfg):
    model = tiny_llama(tok, seed=0)
    config_cls = FastDPOConfig if cls is FastDPOTrainer else DPOConfig
    cfg.setdefault("output_dir", "/tmp/fastdpo-test-peft")
    args = config_cls(max_steps=steps, per_device_train_batch_size=2, logging_steps=1,
                      report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                      learning_rate=1e-2, seed=0, **{"bf16": False, **cfg})
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    torch.manual_seed(0)  # the adapters' A matrices are drawn when the adapter is attached
    return cls(model=model, ref_model=None, args=args, train_dataset=dataset("none"),
               processing_class=tok, peft_config=lora)


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_lora_trains_and_matches_trl(tokenizer):
    theirs, ours = (lora_trainer(c, tokenizer) for c in (DPOTrainer, FastDPOTrainer))
    assert ours.ref_model is None and theirs.ref_model is None  # the adapter-disabled model is it
    start = lora_state(ours.model)
    assert start and start.keys() == lora_state(theirs.model).keys()
    for k, v in lora_state(theirs.model).items():
        assert torch.equal(start[k], v), k
    head = ours.model.get_output_embeddings().weight
    assert not head.requires_grad  # the case under test: a frozen LM head
    base = {k: v.detach().clone() for k, v in ours.model.named_parameters() if "lora_" not in k}

    log_ours, log_theirs = train_log(ours), train_log(theirs)
    assert_logs_close(log_ours, log_theirs)
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in log_ours)
    moved = {k: (v - start[k]).abs().max().item() for k, v in lora_state(ours.model).items()}
    assert all(m > 0 for m in moved.values()), moved
    for k, v in ours.model.named_parameters():  # only the adapters train
        if "lora_" not in k:
            assert torch.equal(v, base[k]), k
    ev = [t.evaluate(eval_dataset=dataset("none")) for t in (ours, theirs)]
    names = ["eval_" + k for k in TRL_METRICS if k not in ("loss", "grad_norm", "num_tokens")]
    assert_logs_close([ev[0]], [ev[1]], names=names + ["eval_loss"])


def _trained_batch(tokenizer, **cfg):
    """A trainer after two LoRA steps (the adapter now changes the outputs) and a batch."""
    tr = lora_trainer(FastDPOTrainer, tokenizer, steps=2, **cfg)
    tr.train()
    tr.model.eval()
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    return tr, batch


def _eager_sequence_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return fastdpo.reference.sequence_logps(logits, labels, shift=True).float()


@pytest.mark.parametrize("as_trl_precompute", [False, True],
                         ids=["in-loss", "compute_ref_log_probs(model)"])
def test_reference_is_the_adapter_disabled_model(tokenizer, as_trl_precompute):
    """In the loss (``ref_model`` None) and in ``compute_ref_log_probs(self.model, batch)``, the
    call TRL's precompute (and a later ``evaluate`` on a new dataset) makes with the policy,
    the reference is the model with its adapter disabled, as in TRL."""
    tr, batch = _trained_batch(tokenizer)
    with tr.model.disable_adapter():
        base = _eager_sequence_logps(tr.model, batch)
    policy = _eager_sequence_logps(tr.model, batch)
    assert (policy - base).abs().max() > 1e-4  # the adapter matters: the check can fail
    model = tr.model if as_trl_precompute else None
    if as_trl_precompute:
        ours = tr.compute_ref_log_probs(model, batch)
    else:
        ours = tr._reference_logps(None, batch, {k: v for k, v in batch.items()
                                                 if k not in tr._non_model_keys()},
                                   batch["input_ids"].masked_fill(batch["completion_mask"] == 0,
                                                                  -100))
    theirs = DPOTrainer.compute_ref_log_probs(tr, tr.model, batch)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(ours), base, rtol=1e-5, atol=1e-5)
    # the adapter is enabled again afterwards
    torch.testing.assert_close(_eager_sequence_logps(tr.model, batch), policy)


def test_precomputed_reference_of_a_trained_adapter_matches_trl(tokenizer):
    """precompute_ref_log_probs with an adapter that already moves the outputs (a LoRA model
    resumed from a checkpoint, or the eval set precomputed after training): TRL's reference is
    the adapter-disabled model, and so is fastdpo's."""
    trainers = {}
    for cls in (FastDPOTrainer, DPOTrainer):
        tr = lora_trainer(cls, tokenizer, steps=2, precompute_ref_log_probs=True)
        tr.train()
        trainers[cls] = tr
    ev = [trainers[c].evaluate(eval_dataset=dataset("none")) for c in (FastDPOTrainer, DPOTrainer)]
    names = ["eval_" + k for k in TRL_METRICS if k not in ("loss", "grad_norm", "num_tokens")]
    assert_logs_close([ev[0]], [ev[1]], names=names + ["eval_loss"])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_frozen_head_fast_path_under_lora(tokenizer, backend):
    """Policy pass: 2 head matmuls over the completion tokens (forward forms the logits and
    d logp / d hidden; backward only scales); reference pass: 1; nothing else of the head."""
    tr = lora_trainer(FastDPOTrainer, tokenizer, steps=1, fastdpo_backend=backend,
                      token_metrics=False)
    tr.model.train()
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    model_kwargs = {k: v for k, v in batch.items() if k not in tr._non_model_keys()}
    model_kwargs["use_cache"] = False
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    cfg = tr.model.config
    V, H = cfg.vocab_size, cfg.hidden_size
    assert V not in (H, cfg.intermediate_size, 4, 2 * H // cfg.num_attention_heads)
    n_rows = int((labels[:, 1:] != -100).sum())
    with MatmulFlops(V) as pol:
        out = tr._head_pass(tr.model, model_kwargs, labels, policy=True, stats=False)
        out.logps.sum().backward()
    assert pol.macs == 2 * n_rows * H * V, pol.macs / (n_rows * H * V)
    lora_grads = [p.grad for n, p in tr.model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    with MatmulFlops(V) as ref:
        tr._reference_logps(None, batch, dict(model_kwargs), labels)
    assert ref.macs == n_rows * H * V, ref.macs / (n_rows * H * V)
    with MatmulFlops(V) as step:  # the whole loss: policy 2 + reference 1
        tr.compute_loss(tr.model, batch).backward()
    assert step.macs == 3 * n_rows * H * V, step.macs / (n_rows * H * V)


@pytest.mark.parametrize("bf16", [False, True])
def test_trained_head_copy_reference_takes_the_policy_route(tokenizer, monkeypatch, bf16):
    """LoRA with a trained copy of the LM head (modules_to_save): the policy takes the fused
    loss, and so must the reference. Asked under use_adapter (adapter disabled), the head read
    as the frozen original, the reference took the log-prob route, and in bf16 its sums differed
    from the policy's in the last bit: first-step rewards/accuracies 1.0 where TRL logs 0.0."""
    import fastdpo.integrations.trl as trl_mod

    calls = []  # the reference through linear_pair_logps: the fused loss's own sums
    real = trl_mod.linear_pair_logps
    monkeypatch.setattr(trl_mod, "linear_pair_logps",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    args = FastDPOConfig(output_dir="/tmp/fastdpo-test-peft", max_steps=1,
                         per_device_train_batch_size=2, report_to=[], use_cpu=True,
                         save_strategy="no", disable_tqdm=True, seed=0, bf16=bf16)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                      modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    torch.manual_seed(0)
    tr = FastDPOTrainer(model=tiny_llama(tokenizer, seed=0), ref_model=None, args=args,
                        train_dataset=dataset("none"), processing_class=tokenizer,
                        peft_config=lora)
    assert tr._fused_loss()
    tr.model.train()
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    tr.compute_loss(tr.model, batch)
    assert calls == [1]
    m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == 0.0, (k, m[k])


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_rewards_start_at_exactly_zero(tokenizer, bf16):
    """Plain LoRA (a frozen head): the policy's native pass is the frozen-head kernel, the
    reference's (adapter disabled, no gradient) the forward kernel. They form the same per-block
    statistics on the same tiles, so before the first update every reward is exactly 0, as TRL
    logs it. (This model's vocabulary is one block; over many blocks, where the kernels used to
    differ by an ulp, test_linear_loss.py::test_native_head_at_a_model_sized_hidden checks it.)"""
    tr = lora_trainer(FastDPOTrainer, tokenizer, steps=1, bf16=bf16)
    assert not tr.model.get_output_embeddings().weight.requires_grad
    tr.model.train()
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    tr.compute_loss(tr.model, batch)
    m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    assert m["logps/chosen"] != 0
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == 0.0, (k, m[k])
