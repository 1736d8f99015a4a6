"""FastDPOTrainer against TRL's own DPOTrainer on a tiny random Llama (CPU, fp32, no downloads)."""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import pathlib
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import peers
from matmul_count import MatmulFlops

peers.require("trl", "datasets")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
                          PreTrainedTokenizerFast)
from trl import DPOConfig, DPOTrainer

import fastdpo
import fastdpo.reference
from fastdpo.bench.memory import saved_for_backward
from fastdpo.integrations.trl import (FastDPOConfig, FastDPOTrainer, RewardColumnsCollator,
                                      check_trl_version)

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHARS = "abcdefghijklmnopqrstuvwxyz .,?!:"
# metrics TRL logs every step; FastDPOTrainer must log the same names with the same values
TRL_METRICS = ("loss", "grad_norm", "entropy", "num_tokens", "logits/chosen", "logits/rejected",
               "mean_token_accuracy", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra threads only add synchronisation (and contention on shared CI)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def tiny_llama(tokenizer, seed=0):
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def tiny_moe(tokenizer, seed=0):
    """Mixtral-style: the router's load-balancing loss is added to the DPO loss (aux_loss)."""
    cfg = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                        router_aux_loss_coef=0.02, max_position_embeddings=128, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg)


def dataset(rewards="scalar"):
    prompts = ["what is up?", "say hi.", "count:", "the sky is"] * 2
    data = {"prompt": prompts,
            "chosen": [" not much", " hi there", " one two", " blue"] * 2,
            "rejected": [" go away", " no", " red", " green grass, wet"] * 2}
    if rewards == "scalar":
        data["chosen_reward"] = [1.0, 2.0, 0.5, 3.0] * 2
        data["rejected_reward"] = [0.0, -1.0, 0.4, 1.0] * 2
    elif rewards == "ensemble":  # three reward models per example
        data["chosen_reward"] = [[1.0, 0.2, 2.0], [2.0, 1.0, -0.5], [0.5, 0.5, 0.1],
                                 [3.0, 2.5, 1.0]] * 2
        data["rejected_reward"] = [[0.0, 0.1, 1.0], [-1.0, 1.5, 0.0], [0.4, -0.3, 0.2],
                                   [1.0, 1.0, 1.5]] * 2
    elif rewards == "certain":  # P(chosen wins) = 1 in fp32: soft-label DPO == sigmoid DPO
        data["chosen_reward"] = [60.0] * 8
        data["rejected_reward"] = [-60.0] * 8
    return Dataset.from_dict(data)


def make_trainer(cls, tokenizer, data, *, seed=0, steps=3, config_cls=None, batch=2,
                 model_fn=tiny_llama, **cfg):
    model = model_fn(tokenizer, seed)
    ref = copy.deepcopy(model)
    config_cls = config_cls or (FastDPOConfig if cls is FastDPOTrainer else DPOConfig)
    cfg.setdefault("output_dir", "/tmp/fastdpo-test-trl")
    args = config_cls(max_steps=steps,
                      per_device_train_batch_size=batch, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", disable_tqdm=True, learning_rate=1e-2, seed=0,
                      bf16=False, **cfg)  # fp32: the comparison is about our math, not bf16's
    return cls(model=model, ref_model=ref, args=args, train_dataset=data,
               processing_class=tokenizer)


def train_log(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_logs_close(ours, theirs, names=TRL_METRICS, rtol=1e-4, atol=1e-6):
    assert len(ours) == len(theirs) > 0
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in names:
            assert k in a, f"step {step}: FastDPOTrainer does not log {k!r}"
            assert math.isclose(a[k], b[k], rel_tol=rtol, abs_tol=atol), \
                f"step {step}: {k} = {a[k]} (fastdpo) vs {b[k]} (TRL)"


@pytest.mark.parametrize("cfg", [
    {},  # sigmoid DPO, live reference model
    {"loss_type": ["sigmoid_norm", "sft"], "loss_weights": [1.0, 0.5]},  # lengths, multi-loss
    {"loss_type": ["robust"], "label_smoothing": 0.1, "ld_alpha": 0.5,
     "precompute_ref_log_probs": True},  # LD-DPO weighting, precomputed reference
    {"model_fn": tiny_moe, "f_divergence_type": "js_divergence"},  # MoE aux loss, f-DPO
], ids=["sigmoid", "sigmoid_norm+sft", "robust-ld-precompute", "moe-js"])
def test_matches_trl_dpo_trainer(tokenizer, cfg):
    data = dataset("none")
    trl_trainer = make_trainer(DPOTrainer, tokenizer, data, **cfg)
    fast_trainer = make_trainer(FastDPOTrainer, tokenizer, data, **cfg)
    names = TRL_METRICS + (("aux_loss",) if "model_fn" in cfg else ())
    assert_logs_close(train_log(fast_trainer), train_log(trl_trainer), names)
    # evaluation (no grad, eval_ prefix) after training, on the trained policies
    ev = [t.evaluate(eval_dataset=dataset("none")) for t in (fast_trainer, trl_trainer)]
    names = ["eval_" + k for k in TRL_METRICS if k not in ("loss", "grad_norm", "num_tokens")]
    assert_logs_close([ev[0]], [ev[1]], names=names + ["eval_loss"])


@pytest.mark.parametrize("loss_type", [["ipo", "sft"], ["sigmoid_norm", "sft"]])
def test_sft_with_length_normalised_loss_on_empty_prompts(tokenizer, loss_type):
    """TRL divides ipo/sigmoid_norm by the unshifted completion count but sft by the shifted
    (scored) one; they differ when the prompt is empty and the completion starts at position 0."""
    data = Dataset.from_dict({"prompt": ["", ""], "chosen": ["not much", "hi there"],
                              "rejected": ["go away", "no"]})
    tr = make_trainer(FastDPOTrainer, tokenizer, data, loss_type=loss_type,
                      loss_weights=[1.0, 0.7], steps=1, fastdpo_backend="torch")
    tr.model.train()
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    assert bool(batch["completion_mask"][:, 0].all())  # the case: no prompt token at all
    ours = tr.compute_loss(tr.model, batch)
    theirs = DPOTrainer._compute_loss(tr, tr.model, batch, False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_entropy_per_side_on_demand(tokenizer):
    """entropy/chosen and entropy/rejected come from the log-prob pass (token means over each
    side's completions; TRL's entropy is their token-weighted mean); entropy_metrics=False
    skips the entropy in the kernel and logs none of them."""
    tr = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), steps=1,
                      fastdpo_backend="torch")
    tr.model.train()
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    tr.compute_loss(tr.model, batch)
    m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    mask = batch["completion_mask"][:, 1:].float()
    nc, nr = (x.sum().item() for x in mask.chunk(2))
    assert m["entropy/chosen"] > 0 and m["entropy/rejected"] > 0
    assert m["entropy"] == pytest.approx(
        (m["entropy/chosen"] * nc + m["entropy/rejected"] * nr) / (nc + nr), rel=1e-6)
    with torch.no_grad():  # against eager entropy of the model's own logits
        logits = tr.model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    chosen = (ent[:2] * mask[:2]).sum() / mask[:2].sum()
    assert m["entropy/chosen"] == pytest.approx(chosen.item(), rel=1e-5)
    off = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), steps=1,
                       fastdpo_backend="torch", entropy_metrics=False)
    log = train_log(off)
    assert not any(k.startswith("entropy") for k in log[0])


def _one_batch(tr):
    tr.model.train()
    return tr._prepare_inputs(next(iter(tr.get_train_dataloader())))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("metrics", [False, True], ids=["no-metrics", "metrics"])
def test_trainable_head_step_is_one_fused_loss(tokenizer, backend, metrics):
    """A trainable head's step runs linear_dpo_loss (gradients formed in forward): policy 3 head
    matmuls over the completion tokens, reference 1, and TRL's token metrics (entropy, mean
    logit, top-1) none: they come from the loss pass's own row statistics (and one
    matrix-vector product). The log-prob pass + dpo_loss took 4 for the policy, and the
    metrics a no-grad pass more."""
    tr = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), steps=1,
                      fastdpo_backend=backend, entropy_metrics=metrics, token_metrics=metrics)
    assert tr._fused_loss()
    batch = _one_batch(tr)
    V, H = tr.model.config.vocab_size, tr.model.config.hidden_size
    assert V not in (H, tr.model.config.intermediate_size)
    n_rows = int(batch["completion_mask"][:, 1:].sum())
    with MatmulFlops(V) as step:
        tr.compute_loss(tr.model, batch).backward()
    assert step.macs == 4 * n_rows * H * V, step.macs / (n_rows * H * V)
    assert tr.model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", [{}, {"precompute_ref_log_probs": True},
                                 {"ld_alpha": 0.5, "loss_type": ["ipo"]}],
                         ids=["live", "precompute", "ld-ipo"])
def test_rewards_start_at_exactly_zero(tokenizer, cfg):
    """Policy = reference before the first update: the reference's log-probs are summed as the
    fused loss sums the policy's (linear_pair_logps), so every reward is exactly 0 as in TRL and
    rewards/accuracies is 0, not a coin flip on the last bit."""
    tr = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), steps=1, batch=4, **cfg)
    assert tr._fused_loss()
    tr.compute_loss(tr.model, _one_batch(tr))
    m = {k: v[-1] for k, v in tr._metrics["train"].items()}
    assert m["logps/chosen"] != 0
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == 0.0, (k, m[k])


def test_token_metrics_with_zero_token_weights(tokenizer):
    """ld_alpha = 0 weighs the tokens past the shorter completion 0: the fused pass skips those
    rows, so its statistics there are 0, and TRL's entropy / top-1 (which count them) must come
    from a pass of their own. Before, entropy read 2.496 against TRL's 3.578 and
    mean_token_accuracy 0.0625 against 0.0 (a skipped row's logp + log_sum is 0: "top-1")."""
    data = dataset("none")
    logs = []
    for cls in (FastDPOTrainer, DPOTrainer):
        tr = make_trainer(cls, tokenizer, data, steps=1, batch=4, ld_alpha=0.0)
        tr.compute_loss(tr.model, _one_batch(tr))
        logs.append({k: v[-1] for k, v in tr._metrics["train"].items()})
    ours, theirs = logs
    for k in ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected"):
        assert ours[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-6), k


def test_frozen_head_and_sft_with_norm_keep_the_log_prob_pass(tokenizer):
    """The routes: a frozen head's log-prob pass is already 2 matmuls and gives the entropy, and
    sft beside ipo / sigmoid_norm needs two completion counts: both keep the log-prob pass."""
    tr = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), steps=1,
                      loss_type=["ipo", "sft"])
    assert not tr._fused_loss()
    tr = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), steps=1)
    tr.model.lm_head.weight.requires_grad_(False)
    assert not tr._fused_loss()


def test_saves_less_for_backward_than_trl(tokenizer):
    """Only the completion positions' hidden rows are kept for the LM head's backward (TRL's
    CPU path keeps a copy of every position's), and no logits are saved at all."""
    data = dataset("none")
    sizes = {}
    for cls in (DPOTrainer, FastDPOTrainer):
        tr = make_trainer(cls, tokenizer, data, batch=4, steps=1)
        tr.model.train()
        batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
        sizes[cls] = saved_for_backward(lambda b: tr.compute_loss(tr.model, b), (batch,),
                                        exclude=list(tr.model.parameters()))["saved_bytes_extra"]
    B, T = batch["input_ids"].shape
    completion = int(batch["completion_mask"][:, 1:].sum())
    H = tr.model.config.hidden_size
    fewer_rows = (B * (T - 1) - completion) * H * 4  # bytes of prompt/padding rows not kept
    assert sizes[FastDPOTrainer] <= sizes[DPOTrainer] - fewer_rows, sizes


def test_reward_columns_reach_the_loss(tokenizer):
    """TRL drops unknown columns; the reward columns survive (scalar and ensemble)."""
    tr = make_trainer(FastDPOTrainer, tokenizer, dataset("ensemble"), loss_type=["soft"])
    assert isinstance(tr.data_collator, RewardColumnsCollator)
    batch = next(iter(tr.get_train_dataloader()))
    assert batch["chosen_reward"].shape == (2, 3) and batch["rejected_reward"].shape == (2, 3)
    # the loss is fastdpo.dpo_loss with soft targets from the ensemble
    tr.model.train()
    inputs = tr._prepare_inputs(batch)
    loss = tr.compute_loss(tr.model, inputs)
    probs = fastdpo.losses.preference_probs(inputs["chosen_reward"].t(),
                                            inputs["rejected_reward"].t()).probs
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = tr.model(input_ids=inputs["input_ids"],
                          attention_mask=inputs["attention_mask"]).logits
        ref = tr.ref_model(input_ids=inputs["input_ids"],
                           attention_mask=inputs["attention_mask"]).logits
    pol = fastdpo.reference.sequence_logps(logits, labels, shift=True).float()
    refl = fastdpo.reference.sequence_logps(ref, labels, shift=True).float()
    d = 0.1 * ((pol[:2] - refl[:2]) - (pol[2:] - refl[2:]))
    expect = (-probs * torch.nn.functional.logsigmoid(d)
              - (1 - probs) * torch.nn.functional.logsigmoid(-d)).mean()
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-5, atol=1e-6)


def test_soft_labels_with_certain_targets_equal_sigmoid_dpo(tokenizer):
    theirs = train_log(make_trainer(DPOTrainer, tokenizer, dataset("certain")))
    ours = train_log(make_trainer(FastDPOTrainer, tokenizer, dataset("certain"),
                                  loss_type=["soft"]))
    assert_logs_close(ours, theirs)
    assert all(h["targets/probs"] == 1.0 for h in ours)


def test_distill_trains_and_missing_columns_are_named(tokenizer):
    log = train_log(make_trainer(FastDPOTrainer, tokenizer, dataset("scalar"),
                                 loss_type=["distill"], steps=2))
    assert all(math.isfinite(h["loss"]) for h in log)
    tr = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), loss_type=["soft"], steps=1)
    with pytest.raises(ValueError, match="chosen_reward"):
        tr.train()


def test_fallback_to_trl_when_unsupported(tokenizer):
    """use_weighting (WPO) needs log sum p^2: TRL's own path runs, with a warning."""
    data = dataset("scalar")
    theirs = train_log(make_trainer(DPOTrainer, tokenizer, data, use_weighting=True, steps=1))
    with pytest.warns(UserWarning, match="use_weighting"):
        tr = make_trainer(FastDPOTrainer, tokenizer, data, use_weighting=True, steps=1)
    assert_logs_close(train_log(tr), theirs)
    with pytest.raises(ValueError, match="fused path"):
        make_trainer(FastDPOTrainer, tokenizer, data, use_weighting=True, loss_type=["soft"])


def test_plain_dpo_config_and_version_check(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning on the default path
        tr = make_trainer(FastDPOTrainer, tokenizer, dataset("none"), config_cls=DPOConfig,
                          steps=1)
    assert train_log(tr)
    check_trl_version("1.15.2")
    check_trl_version("1.16.0")
    for bad in ("1.14.2", "1.17.0.dev0", "2.0.0"):
        with pytest.raises(ImportError, match="supports TRL 1.15.x, 1.16.x"):
            check_trl_version(bad)


def test_soft_label_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("soft_label_dpo",
                                                  ROOT / "examples" / "soft_label_dpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--steps", "2", "--rm-steps", "2", "--threads", "1",
              "--output-dir", "/tmp/fastdpo-test-example"])
    out = capsys.readouterr().out
    assert "targets/probs" in out and "rewards/accuracies" in out


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tok = tokenizer.__wrapped__()
    tr = make_trainer(FastDPOTrainer, tok, dataset("none"), steps=2, ddp_backend="gloo",
                      output_dir=out_dir)
    assert tr.args.world_size == world
    log = train_log(tr)
    assert isinstance(tr.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    assert all(math.isfinite(h["loss"]) for h in log)
    p = torch.cat([x.detach().flatten() for x in tr.model.parameters()])
    ps = [torch.empty_like(p) for _ in range(world)]
    dist.all_gather(ps, p)
    # the ranks saw different pairs: equal weights after two steps mean the gradients were
    # all-reduced, i.e. the policy forward went through DDP's own forward
    torch.testing.assert_close(ps[0], ps[1], rtol=0, atol=0)
    assert not torch.equal(p, torch.cat([x.flatten() for x in tiny_llama(tok).parameters()]))


def test_ddp_gradients_are_synchronised(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
