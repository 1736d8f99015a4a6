"""Hugging Face ``transformers`` causal LMs into the fused LM head, logits never computed.

A trainer that does ``logits = model(input_ids, attention_mask=mask).logits`` followed by a
log-prob gather switches in one line::

    logps = fastdpo.integrations.hf.sequence_logps(model, input_ids, labels,
                                                   attention_mask=mask, shift=True)

or, to keep control of the call, :func:`lm_head_inputs` runs only the model's decoder and returns
what :func:`fastdpo.linear_token_logps` needs (hidden states, LM-head weight and bias, and the
logit transform the model applies: Gemma-2/3 ``final_logit_softcapping``, Cohere ``logit_scale``,
Granite ``logits_scaling``)::

    head = lm_head_inputs(model, input_ids=input_ids, attention_mask=mask)
    logps = fastdpo.linear_sequence_logps(head.hidden, head.weight, labels, shift=True,
                                          **head.kwargs())

Under FSDP2 (``fully_shard``) :func:`head_params` gathers a sharded LM-head weight for the fused
head with FSDP's gradient semantics (:func:`full_param`).

Only ``transformers`` model conventions are used (``get_decoder`` / ``base_model_prefix`` /
``get_output_embeddings``); ``transformers`` itself is not imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linear import linear_sequence_logps, linear_token_logps


@dataclass
class LMHeadInputs:
    hidden: torch.Tensor            # (B, T, H) final hidden states (after the final norm)
    weight: torch.Tensor            # (V, H) LM-head weight (the embedding matrix when tied)
    bias: torch.Tensor | None = None
    softcap: float | None = None
    logit_scale: float = 1.0
    outputs: object = None          # the decoder's full output (past_key_values, aux losses...)

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`fastdpo.linear_token_logps` for this head."""
        return {"bias": self.bias, "softcap": self.softcap, "logit_scale": self.logit_scale}


def decoder_of(model):
    """The base module of a ``*ForCausalLM`` model: everything but the LM head."""
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError):
            dec = None
        if dec is not None and dec is not model:
            return dec
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module):
        return getattr(model, prefix)
    if isinstance(getattr(model, "model", None), torch.nn.Module):
        return model.model
    raise TypeError(f"cannot find the decoder of {type(model).__name__}: it has no get_decoder(), "
                    f"base_model_prefix attribute or .model")


def head_of(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"cannot find the LM head of {type(model).__name__}")
    return head


def logit_transform(model) -> tuple[float | None, float]:
    """``(softcap, logit_scale)`` that ``model`` applies to ``lm_head(hidden)``."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    scale = 1.0
    model_scale = getattr(model, "logit_scale", None)  # Cohere keeps it on the model
    if isinstance(model_scale, (int, float)):
        scale *= float(model_scale)
    elif getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):  # Granite divides
        scale /= float(cfg.logits_scaling)
    return (float(softcap) if softcap else None), scale


def head_params(model):
    """``(weight, bias, softcap, logit_scale)`` of ``model``'s LM head; a sharded (DTensor)
    weight and bias are gathered, differentiably (see :func:`full_param`)."""
    head = head_of(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    fsdp = hasattr(weight, "full_tensor") and _is_fsdp2(model)  # walk the modules only then
    weight = full_param(weight, fsdp=fsdp, name="lm_head.weight")
    bias = full_param(bias, fsdp=fsdp, name="lm_head.bias") if bias is not None else None
    return (weight, bias, *logit_transform(model))


def _is_fsdp2(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_param(t, *, fsdp: bool, name: str = "parameter"):
    """The full tensor of a parameter read outside its FSDP2 group's forward.

    FSDP2 holds a parameter as a DTensor sharded over the data-parallel ranks, except while its
    group is unsharded (then it is a plain tensor and FSDP2 reduce-scatters its gradient
    itself). A DTensor is all-gathered here; its gradient must then be *averaged* over the ranks
    as FSDP2 does (each rank saw different data), so the backward reduce-scatters a partial
    average into the shard (DTensor's default backward would keep each rank's own gradient).
    Only FSDP's placements are accepted: ``(Shard(0),)`` or HSDP's ``(Replicate(), Shard(0))``;
    anything else (tensor parallelism on top of FSDP) is refused rather than given a wrong
    gradient. FSDP2's ``set_gradient_divide_factor`` is not seen on this path. Outside FSDP (a
    tensor-parallel head: every rank has the same data) the default gather is right.
    """
    if not hasattr(t, "full_tensor"):
        return t
    if not fsdp:
        return t.full_tensor()
    from torch.distributed.tensor import Partial, Replicate, Shard

    placements = tuple(t.placements)
    if placements not in ((Shard(0),), (Replicate(), Shard(0))):
        raise ValueError(
            f"{name} is a DTensor with placements {placements} under FSDP2: fastdpo gathers the "
            f"LM head for the fused head only from FSDP's (Shard(dim=0),) or HSDP's "
            f"(Replicate(), Shard(dim=0)) layout, where the gradient is an average over the "
            f"ranks. Keep the LM head out of tensor parallelism, or compute the logits with "
            f"the model's own head and use fastdpo.sequence_logps(..., process_group=...).")
    return t.full_tensor(grad_placements=[Partial("avg")] * len(placements))


def lm_head_inputs(model, **model_kwargs) -> LMHeadInputs:
    """Run the decoder of a causal LM (not its LM head) and return what the fused head needs.

    ``model_kwargs`` go to the decoder (``input_ids``, ``attention_mask``, ``position_ids``,
    ``inputs_embeds``...). ``labels`` / ``logits_to_keep`` are head arguments and are refused.
    The decoder is called directly, bypassing a wrapper's forward: under FSDP2 run the wrapped
    model's own forward instead (``output_hidden_states=True``, ``logits_to_keep`` an empty
    index tensor, as :class:`fastdpo.integrations.trl.FastDPOTrainer` does) and take the head
    from :func:`head_params`.
    """
    for bad in ("labels", "logits_to_keep", "num_logits_to_keep"):
        if bad in model_kwargs:
            raise TypeError(f"{bad!r} is an argument of the LM head, not of the decoder")
    model_kwargs.setdefault("use_cache", False)
    out = decoder_of(model)(**model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = head_of(model)
    softcap, scale = logit_transform(model)
    return LMHeadInputs(hidden, head.weight, getattr(head, "bias", None), softcap, scale, out)


def _split(kw):
    names = ("attention_mask", "position_ids", "inputs_embeds", "past_key_values",
             "cache_position", "token_type_ids")
    model_kw = {k: kw.pop(k) for k in names if k in kw}
    model_kw.update(kw.pop("model_kwargs", None) or {})
    return model_kw, kw


def token_logps(model, input_ids, labels, **kwargs):
    """:func:`fastdpo.linear_token_logps` of ``labels`` under ``model``. Decoder arguments
    (``attention_mask``, ``position_ids``, ..., or a ``model_kwargs`` dict) go to the model, the
    rest (``shift``, ``temperature``, ``return_entropy``, ``backend``...) to the log-prob call."""
    model_kw, kw = _split(dict(kwargs))
    head = lm_head_inputs(model, input_ids=input_ids, **model_kw)
    return linear_token_logps(head.hidden, head.weight, labels, **head.kwargs(), **kw)


def sequence_logps(model, input_ids, labels, **kwargs):
    """:func:`fastdpo.linear_sequence_logps` under ``model``; arguments as in
    :func:`token_logps`."""
    model_kw, kw = _split(dict(kwargs))
    head = lm_head_inputs(model, input_ids=input_ids, **model_kw)
    return linear_sequence_logps(head.hidden, head.weight, labels, **head.kwargs(), **kw)
