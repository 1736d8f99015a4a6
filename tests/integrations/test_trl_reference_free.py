"""FastCPOTrainer / FastORPOTrainer against TRL's own experimental trainers (tiny Llama, CPU)."""

import os

import pytest

import peers

peers.require("trl", "datasets")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# the tiny tokenizer / Llama / dataset of the DPO trainer tests (fixtures are used by name)
from test_trl import (assert_logs_close, dataset, one_thread, tiny_llama,  # noqa: E402,F401
                      tokenizer)

from fastdpo.integrations.trl_reference_free import (CPOConfig, CPOTrainer,  # noqa: E402
                                                     FastCPOTrainer, FastORPOTrainer,
                                                     ORPOConfig, ORPOTrainer)

COMMON = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
          "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
          "logits/rejected", "nll_loss")


def train(cls, config_cls, tokenizer, steps=2, **cfg):
    model = tiny_llama(tokenizer)
    args = config_cls(output_dir="/tmp/fastdpo-test-trl-rf", max_steps=steps,
                      per_device_train_batch_size=2, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", disable_tqdm=True, learning_rate=1e-2, seed=0,
                      bf16=False, max_length=64, **cfg)
    tr = cls(model=model, args=args, train_dataset=dataset("none"), processing_class=tokenizer)
    tr.train()
    return [h for h in tr.state.log_history if "loss" in h], tr


@pytest.mark.parametrize("cfg", [{}, {"loss_type": "simpo", "cpo_alpha": 0.0},
                                 {"loss_type": "ipo", "alpha": 0.1}],
                         ids=["cpo", "simpo", "ipo-alphapo"])
def test_fast_cpo_trainer_matches_trl(tokenizer, cfg):
    theirs, _ = train(CPOTrainer, CPOConfig, tokenizer, **cfg)
    ours, tr = train(FastCPOTrainer, CPOConfig, tokenizer, **cfg)
    assert "fastdpo" in tr._tag_names
    assert_logs_close(ours, theirs, COMMON, rtol=2e-4, atol=1e-6)


def test_fast_orpo_trainer_matches_trl(tokenizer):
    theirs, _ = train(ORPOTrainer, ORPOConfig, tokenizer)
    ours, _ = train(FastORPOTrainer, ORPOConfig, tokenizer)
    assert_logs_close(ours, theirs, COMMON + ("log_odds_ratio", "log_odds_chosen"), rtol=2e-4,
                      atol=1e-6)


def test_no_full_logits_in_the_forward(tokenizer):
    """The policy forward keeps no (2B, T, V) logits for backward."""
    from fastdpo.bench.memory import saved_for_backward
    _, tr = train(FastCPOTrainer, CPOConfig, tokenizer, steps=1)
    batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    V = tr.model.config.vocab_size
    B2, T = 2 * batch["chosen_input_ids"].shape[0], max(batch["chosen_input_ids"].shape[1],
                                                          batch["rejected_input_ids"].shape[1])
    params = list(tr.model.parameters())
    info = saved_for_backward(lambda b: tr.concatenated_forward(tr.model, b), (batch,),
                              exclude=params)
    theirs = saved_for_backward(lambda b: CPOTrainer.concatenated_forward(tr, tr.model, b),
                                (batch,), exclude=params)
    assert info["saved_bytes_extra"] <= theirs["saved_bytes_extra"] - B2 * T * V * 4 // 2, \
        (info, theirs)
