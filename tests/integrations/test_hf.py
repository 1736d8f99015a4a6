"""fastdpo.integrations.hf: tiny random-init transformers models, fused head vs the logits."""

import pytest
import torch

import fastdpo
from fastdpo.integrations import hf

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def build(name):
    torch.manual_seed(0)
    if name == "llama":
        cfg = transformers.LlamaConfig(**SMALL)
        return transformers.LlamaForCausalLM(cfg)
    if name == "llama-tied":
        cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg)
    if name == "gemma2":  # final_logit_softcapping = 30 by default; make it bite
        cfg = transformers.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=2.0,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return transformers.Gemma2ForCausalLM(cfg)
    if name == "cohere":
        cfg = transformers.CohereConfig(**SMALL, logit_scale=0.5, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2)
        return transformers.CohereForCausalLM(cfg)
    if name == "granite":
        cfg = transformers.GraniteConfig(**SMALL, logits_scaling=4.0)
        return transformers.GraniteForCausalLM(cfg)
    raise KeyError(name)


def batch(V, B=2, T=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # prompt
    return ids, mask, labels


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gemma2", "cohere", "granite"])
def test_sequence_logps_match_logits_path(name):
    model = build(name).float()
    if name == "llama-tied":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, mask, labels = batch(model.config.vocab_size)
    out = hf.sequence_logps(model, ids, labels, attention_mask=mask, shift=True, backend="torch")
    out.sum().backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    ref = fastdpo.sequence_logps(logits, labels, shift=True, backend="torch")
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fused_grads.keys() == ref_grads.keys()
    for n in ref_grads:  # includes the (tied) embedding / LM-head weight
        torch.testing.assert_close(fused_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lm_head_inputs_reads_the_transform():
    g2 = build("gemma2")
    head = hf.lm_head_inputs(g2, input_ids=torch.tensor([[3, 4, 5]]))
    assert head.softcap == 2.0 and head.logit_scale == 1.0
    assert head.hidden.shape == (1, 3, 32) and head.weight is g2.get_output_embeddings().weight
    assert hf.logit_transform(build("cohere")) == (None, 0.5)
    assert hf.logit_transform(build("granite")) == (None, 0.25)
    assert hf.logit_transform(build("llama")) == (None, 1.0)


def test_token_logps_and_entropy_one_line():
    model = build("llama")
    ids, mask, labels = batch(model.config.vocab_size)
    lp, ent = hf.token_logps(model, ids, labels, attention_mask=mask, shift=True,
                             return_entropy=True, backend="torch")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    rlp, rent = fastdpo.token_logps(logits, labels, shift=True, return_entropy=True,
                                    backend="torch")
    torch.testing.assert_close(lp, rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, rent, rtol=1e-5, atol=1e-5)


def test_head_arguments_refused():
    with pytest.raises(TypeError, match="LM head"):
        hf.lm_head_inputs(build("llama"), input_ids=torch.tensor([[3]]), labels=torch.tensor([[3]]))
