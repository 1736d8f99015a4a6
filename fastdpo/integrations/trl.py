"""TRL integration: :class:`FastDPOTrainer`, a drop-in ``trl.DPOTrainer`` on fastdpo's kernels.

Switch by changing one import::

    from fastdpo.integrations.trl import FastDPOTrainer as DPOTrainer

Same constructor, same ``DPOConfig`` (or :class:`FastDPOConfig` for the extra options), same
logged metrics. What changes inside ``_compute_loss`` / ``compute_ref_log_probs``:

* with a trainable LM head, the policy's head pass and the loss are one
  :func:`fastdpo.linear_dpo_loss` call: the gradients of the hidden states and the head are
  formed in its forward, 3 head matmuls instead of the 4 of a log-prob pass and its backward,
  and no logits are kept. The reference's log-probs come from :func:`fastdpo.linear_pair_logps`
  (the same kernels and sums, so on CPU equal models give rewards of exactly 0, as in TRL);
* a frozen head (LoRA), or ``sft`` beside ``ipo`` / ``sigmoid_norm`` (TRL divides those by two
  different completion counts), keeps the fused log-prob pass
  (:func:`fastdpo.linear.linear_token_logps`, 2 matmuls with a frozen head) on the completion
  positions only and :func:`fastdpo.dpo_loss`;
* the loss types add two to TRL's: ``soft`` (soft-label DPO, target = P(chosen beats
  rejected)) and ``distill`` (regress the implicit reward margin on the reward model's margin).
  Their targets come from reward columns of the dataset (``chosen_reward`` /
  ``rejected_reward``: a number, or a list of numbers for an ensemble of reward models) through
  :func:`fastdpo.preference_probs`.

The policy's forward goes through the (possibly DDP/FSDP-wrapped) model's own ``forward`` with
``output_hidden_states=True`` and an empty ``logits_to_keep`` index, so wrappers see their usual
forward (DDP's gradient hooks, FSDP's unsharding) and the model forms no logits at all.

Configurations the fused path does not cover fall back to TRL's own computation, with a
warning naming the reason: vision-language batches, ``use_weighting`` (WPO needs the sum of
squared probabilities), DeepSpeed ZeRO-3 (the LM head is partitioned outside its forward), the
``sft`` loss with ``ld_alpha``, and ``return_outputs=True`` (deprecated in TRL).

Supported TRL: 1.15.x and 1.16.x (the ``DPOTrainer`` internals this subclass relies on are the
same in both; other versions raise at import).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

# first: it checks the TRL version before anything imports TRL's internals
from .trl_config import (TARGET_LOSS_TYPES, FastDPOConfig, RewardColumnsCollator,
                         check_trl_version)

from accelerate.utils import is_peft_model  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from ..linear import linear_token_logps  # noqa: E402
from ..losses import dpo_loss, preference_probs  # noqa: E402
from ..losses.functional import LABEL_SMOOTHING_TYPES, NORM_TYPES  # noqa: E402
from ..losses.fused_linear import linear_dpo_loss, linear_pair_logps  # noqa: E402
from .hf import head_of, head_params, lm_head_inputs  # noqa: E402
from .reference import StoredReference  # noqa: E402
from .trl_metrics import HeadPass, log_dpo_metrics, pass_token_stats, token_stats  # noqa: E402

__all__ = ["FastDPOTrainer", "FastDPOConfig", "RewardColumnsCollator", "check_trl_version"]

@dataclass
class _Decoded:
    """The decoder's output for the fused head: hidden states aligned with the labels."""

    hidden: torch.Tensor                 # (B, T, H)
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float
    aux_loss: torch.Tensor | None        # MoE router loss of the forward, when it computed one


def _scatter(mask, x, dtype=None):
    """``x`` (one value per ``True`` of ``mask``) back into ``mask``'s shape, 0 elsewhere;
    masked_scatter keeps an all-prompt batch connected to the graph (a zero gradient)."""
    z = torch.zeros(mask.shape, dtype=dtype or x.dtype, device=x.device)
    return z.masked_scatter(mask.to(x.device), x)


def _ld_split(mask):
    """TRL's LD-DPO split of a ``[chosen; rejected]`` completion mask ``(2B, T)``: each
    position's count of completion tokens so far, and its pair's shorter completion length."""
    pos = mask.cumsum(dim=1)
    shared = torch.minimum(*mask.sum(dim=1).long().chunk(2, dim=0)).repeat(2).unsqueeze(1)
    return pos, shared


class FastDPOTrainer(StoredReference, DPOTrainer):
    """``trl.DPOTrainer`` computing log-probs with fastdpo's fused LM head and the loss with
    :func:`fastdpo.dpo_loss`. Same arguments as ``DPOTrainer``; see the module docstring.
    Datasets that carry the reference columns are loaded, not recomputed (StoredReference)."""

    _tag_names = ["trl", "dpo", "fastdpo"]

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        # Read before DPOTrainer.__init__: with precompute_ref_log_probs it already calls
        # compute_ref_log_probs, which needs them.
        self._fd_backend = getattr(args, "fastdpo_backend", "auto")
        self._fd_reward_columns = tuple(getattr(args, "reward_columns",
                                                ("chosen_reward", "rejected_reward")))
        if len(self._fd_reward_columns) != 2:
            raise ValueError("reward_columns must name two columns: chosen's and rejected's reward")
        self._fd_reason = None
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        self.data_collator = RewardColumnsCollator(self.data_collator, self._fd_reward_columns)
        needs_targets = [t for t in self.loss_types if t in TARGET_LOSS_TYPES]
        reason = self._fallback_reason()
        if needs_targets and reason:
            raise ValueError(f"loss_type {needs_targets} needs FastDPOTrainer's fused path, which "
                             f"is unavailable here: {reason}")
        if reason:
            warnings.warn(f"FastDPOTrainer: using TRL's own loss computation because {reason}.",
                          stacklevel=2)

    # ------------------------------------------------------------------ configuration

    def _fallback_reason(self) -> str:
        """Why the fused path cannot run (empty when it can)."""
        if self._fd_reason is not None:
            return self._fd_reason
        reason = ""
        if getattr(self, "_is_vision_dataset", False):
            reason = "vision-language batches are not supported by the fused path"
        elif self.use_weighting:
            reason = "use_weighting (WPO) needs log(sum p^2), which fastdpo does not compute"
        elif "sft" in self.loss_types and self.ld_alpha is not None:
            reason = "the 'sft' loss with ld_alpha is not supported by the fused path"
        elif self.is_deepspeed_enabled and getattr(
                self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
            reason = "DeepSpeed ZeRO-3 partitions the LM head outside its forward"
        else:
            base = self.accelerator.unwrap_model(self.model)
            params = inspect.signature(base.forward).parameters
            if "logits_to_keep" not in params and not any(
                    p.kind is p.VAR_KEYWORD for p in params.values()):
                reason = (f"{type(base).__name__}.forward takes no logits_to_keep argument "
                          f"(needed to skip the full logits)")
        self._fd_reason = reason
        return reason

    def _set_signature_columns_if_needed(self):
        # Trainer drops dataset columns the model does not take: keep the reward columns.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in self._fd_reward_columns if c not in self._signature_columns]

    def _non_model_keys(self):
        return {"completion_mask", "ref_chosen_logps", "ref_rejected_logps",
                *self._fd_reward_columns}

    # ------------------------------------------------------------------ log-probs

    def _head_pass(self, model, model_kwargs, labels, *, policy: bool, stats: bool) -> HeadPass:
        """Per-token log-probs of ``labels`` (prompt and padding = -100) under ``model``."""
        # Mixed precision: accelerate runs a prepared model's forward under autocast; run the
        # decoder-only reference call and the LM head under the same autocast so that policy,
        # reference and TRL's own head see the same precision.
        with self.accelerator.autocast():
            return self._head_pass_impl(model, model_kwargs, labels, policy=policy, stats=stats)

    def _decoded(self, model, model_kwargs, labels, *, policy) -> _Decoded:
        unwrapped = self.accelerator.unwrap_model(model)
        # The policy (and any FSDP/DeepSpeed-wrapped model) runs its wrapper's forward, so DDP
        # sees the forward it needs for gradient sync and FSDP unshards; the frozen reference of
        # a plain setup runs just its decoder (nothing of the head is computed).
        if policy or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # An empty index tensor: no position goes through the model's own LM head, and
            # (unlike an int, which slices a view) nothing of the hidden states is saved for it.
            keep = torch.zeros(0, dtype=torch.long, device=model_kwargs["input_ids"].device)
            outputs = model(**model_kwargs, output_hidden_states=True, logits_to_keep=keep)
            hidden = outputs.hidden_states[-1]  # after the final norm (transformers convention)
        else:
            head = lm_head_inputs(unwrapped, **model_kwargs)
            hidden, outputs = head.hidden, head.outputs
        weight, bias, softcap, logit_scale = head_params(unwrapped)
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones.
        hidden = hidden[:, -labels.shape[1]:]
        # keep only the aux loss of the outputs: not the tuple of every layer's hidden states
        return _Decoded(hidden, weight, bias, softcap, logit_scale,
                        getattr(outputs, "aux_loss", None))

    def _head_pass_impl(self, model, model_kwargs, labels, *, policy, stats):
        d = self._decoded(model, model_kwargs, labels, policy=policy)
        weight, bias, softcap, logit_scale = d.weight, d.bias, d.softcap, d.logit_scale
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100
        # Only completion positions: the prompt/padding rows' hidden states are not kept for
        # backward (the compaction costs one host sync for the row count, as in TRL on GPU).
        rows = d.hidden[:, :-1][mask].to(weight.device)
        lab = shift_labels[mask].to(weight.device)
        kw = dict(bias=bias, softcap=softcap, logit_scale=logit_scale, backend=self._fd_backend)
        want_entropy = stats and getattr(self.args, "entropy_metrics", True)
        # the entropy is a metric: "detached" keeps a frozen (LoRA) head's 2-matmul path
        out = linear_token_logps(rows, weight, lab,
                                 return_entropy="detached" if want_entropy else False, **kw)
        lp, ent = out if want_entropy else (out, None)

        def scatter(x, dtype=None):
            return _scatter(mask, x, dtype)

        per_token = scatter(lp)
        mean_logits = is_top1 = None
        if stats and getattr(self.args, "token_metrics", True):
            m, t1, _ = token_stats(rows.detach(), weight.detach(), lab,
                                   None if bias is None else bias.detach(), softcap,
                                   logit_scale, backend=self._fd_backend)
            mean_logits, is_top1 = scatter(m), scatter(t1, torch.bool)
        return HeadPass(per_token, None if ent is None else scatter(ent.detach()), mean_logits,
                        is_top1, d.aux_loss)

    def _sequence_logps(self, per_token, shift_completion_mask):
        """Sum over the completion, or TRL's LD-DPO weighting of the tokens past the shorter
        completion of the pair (``ld_alpha``)."""
        if self.ld_alpha is None:
            return per_token.sum(dim=1)
        pos, shared = _ld_split(shift_completion_mask)
        in_shared = (pos > 0) & (pos <= shared)
        tail = pos > shared
        return (per_token * in_shared).sum(dim=1) + self.ld_alpha * (per_token * tail).sum(dim=1)

    def _reference_logps(self, model, inputs, model_kwargs, labels):
        shift_completion_mask = inputs["completion_mask"][..., 1:]
        # the policy's route, asked here: under use_adapter a trained head copy
        # (modules_to_save) reads as the frozen original, and the sums would differ
        fused = self._fused_loss()
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):
                # the adapter-disabled policy, also when the precompute pass passes it as `model`
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=adapter):
                    return self._ref_pass(self.model if model is None else model, model_kwargs,
                                          labels, shift_completion_mask, fused)
            return self._ref_pass(model if model is not None else self.ref_model, model_kwargs,
                                  labels, shift_completion_mask, fused)

    def _ref_pass(self, model, model_kwargs, labels, shift_completion_mask, fused):
        """``(chosen, rejected)`` reference log-probs, summed as the policy's are on its route
        ``fused`` (then :func:`linear_pair_logps`: on CPU equal models give equal bits, so the
        rewards start at exactly 0, as in TRL)."""
        if not fused:
            ref = self._head_pass(model, model_kwargs, labels, policy=False, stats=False)
            return self._sequence_logps(ref.logps, shift_completion_mask).chunk(2, dim=0)
        with self.accelerator.autocast():
            d = self._decoded(model, model_kwargs, labels, policy=False)
            lab = labels.to(d.weight.device)
            return linear_pair_logps(d.hidden.to(d.weight.device), d.weight, lab, bias=d.bias,
                                     softcap=d.softcap, logit_scale=d.logit_scale,
                                     token_weights=self._ld_weights(lab),
                                     backend=self._fd_backend)

    def _ld_weights(self, labels):
        """TRL's LD-DPO token weights (``ld_alpha`` past the shorter completion of the pair),
        shaped like ``labels``; None without ``ld_alpha``."""
        if self.ld_alpha is None:
            return None
        pos, shared = _ld_split(labels[:, 1:] != -100)
        w = torch.where(pos <= shared, 1.0, float(self.ld_alpha))
        return torch.cat([torch.zeros_like(w[:, :1]), w], dim=1)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (``precompute_ref_log_probs``)."""
        if self._fallback_reason():
            return super().compute_ref_log_probs(model, inputs)
        model_kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_keys()}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        # `model` is the reference (or the policy before training, or a DeepSpeed engine)
        return self._reference_logps(model, inputs, model_kwargs, labels)

    # ------------------------------------------------------------------ loss

    def _targets(self, inputs):
        types = set(self.loss_types)
        if not types & set(TARGET_LOSS_TYPES):
            return None, None
        c_col, r_col = self._fd_reward_columns
        missing = [c for c in (c_col, r_col) if c not in inputs]
        if missing:
            raise ValueError(f"loss_type {sorted(types & set(TARGET_LOSS_TYPES))} needs the reward "
                             f"columns {missing} in the dataset (set FastDPOConfig.reward_columns "
                             f"to rename them)")
        cr, rr = inputs[c_col].float(), inputs[r_col].float()
        if cr.dim() == 2:  # (B, E): one column per ensemble member -> (E, B)
            cr, rr = cr.t(), rr.t()
        t = preference_probs(cr, rr, temperature=getattr(self.args, "reward_temperature", 1.0),
                             ensemble=getattr(self.args, "reward_ensemble", "mean_prob"))
        return (t.probs if "soft" in types else None), (t.margins if "distill" in types else None)

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs or self._fallback_reason():
            if any(t in TARGET_LOSS_TYPES for t in self.loss_types):
                raise ValueError("loss types 'soft'/'distill' need the fused path "
                                 f"({self._fallback_reason() or 'return_outputs=True'})")
            inputs = {k: v for k, v in inputs.items() if k not in self._fd_reward_columns}
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in self._non_model_keys()}
        model_kwargs["use_cache"] = False
        ref_kwargs = dict(model_kwargs)  # the frozen reference never computes router logits
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)

        if self._fused_loss():
            # the policy's decoder runs first, as in TRL (same RNG order for dropout)
            with self.accelerator.autocast():
                dec = self._decoded(model, model_kwargs, labels, policy=True)
            refs = self._reference_pair(inputs, ref_kwargs, labels)
            target_probs, reward_margins = self._targets(inputs)
            pol, loss, chosen_logps, rejected_logps = self._fused_policy_loss(
                dec, labels, completion_mask, refs, target_probs, reward_margins)
            ref_chosen_logps, ref_rejected_logps = refs
        else:
            pol = self._head_pass(model, model_kwargs, labels, policy=True, stats=True)
            logps = self._sequence_logps(pol.logps, shift_completion_mask)
            chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # batch = [chosen; rejected]
            ref_chosen_logps, ref_rejected_logps = (
                r.to(chosen_logps) for r in self._reference_pair(inputs, ref_kwargs, labels))
            target_probs, reward_margins = self._targets(inputs)
            loss = self._pair_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps, completion_mask, target_probs,
                                   reward_margins)

        if self.aux_loss_enabled:
            aux_loss = pol.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item())
        log_dpo_metrics(self, mode, inputs, pol, shift_completion_mask, chosen_logps,
                        rejected_logps, ref_chosen_logps, ref_rejected_logps, target_probs)
        return loss

    def _reference_pair(self, inputs, ref_kwargs, labels):
        """The reference's ``(B,)`` chosen and rejected log-probs: stored, or computed."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self._reference_logps(self.ref_model, inputs, ref_kwargs, labels)

    def _loss_args(self, types):
        """``dpo_loss`` keywords shared by both routes, for the loss types ``types``."""
        uses_smoothing = any(t in LABEL_SMOOTHING_TYPES for t in types)
        return dict(beta=self.beta, label_smoothing=self.label_smoothing if uses_smoothing else 0.0,
                    discopop_tau=self.args.discopop_tau,
                    f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef)

    def _fused_loss(self) -> bool:
        """Whether the policy's head pass and the loss run as one :func:`linear_dpo_loss` call:
        3 head matmuls with a trainable head instead of 4. A frozen head (LoRA) keeps the
        log-prob pass, whose 2 matmuls also give the entropy. Not with ``sft`` beside ``ipo`` /
        ``sigmoid_norm`` either: TRL divides those by two different completion counts."""
        types = set(self.loss_types)
        if "sft" in types and types & set(NORM_TYPES):
            return False
        return bool(head_of(self.accelerator.unwrap_model(self.model)).weight.requires_grad)

    def _metrics_in_pass(self, dec) -> bool:
        """Whether the token metrics come from the loss pass's own row statistics: not for a
        soft-capped head (its mean logit needs the logits' tiles), nor with ``ld_alpha = 0``
        (the pass skips the rows of weight 0, which TRL's token metrics count)."""
        return not dec.softcap and self.ld_alpha != 0

    def _fused_policy_loss(self, dec, labels, completion_mask, refs, target_probs,
                           reward_margins):
        """``(head pass, loss, chosen_logps, rejected_logps)`` of the policy from one
        :func:`linear_dpo_loss` call: the gradients are formed in its forward. The logged
        token metrics come from the same pass's row statistics (with a soft-capped head, from
        one no-grad pass over the completion rows)."""
        types = list(self.loss_types)
        weights = list(self.loss_weights or (1.0,) * len(types))
        lab = labels.to(dec.weight.device)
        mask = lab[:, 1:] != -100
        tw, lengths = self._ld_weights(lab), None
        if set(types) & set(NORM_TYPES):  # TRL's count: the unshifted completion mask
            lengths = completion_mask.to(lab.device).sum(dim=1).chunk(2, dim=0)
        want_ent = getattr(self.args, "entropy_metrics", True)
        want_tok = getattr(self.args, "token_metrics", True)
        in_pass = (want_ent or want_tok) and self._metrics_in_pass(dec)
        with self.accelerator.autocast():
            out = linear_dpo_loss(
                dec.hidden.to(dec.weight.device), dec.weight, lab, bias=dec.bias,
                ref_chosen_logps=refs[0], ref_rejected_logps=refs[1], loss_type=types,
                loss_weights=weights, target_probs=target_probs, reward_margins=reward_margins,
                softcap=dec.softcap, logit_scale=dec.logit_scale, token_weights=tw,
                chosen_lengths=None if lengths is None else lengths[0],
                rejected_lengths=None if lengths is None else lengths[1],
                backend=self._fd_backend, per_pair_metrics=True, token_stats=in_pass,
                **self._loss_args(types))
            loss, m = out[:2]
            ent = mean_logits = is_top1 = None
            if want_ent or want_tok:
                rows = dec.hidden[:, :-1].detach().to(dec.weight.device)[mask]
                b = None if dec.bias is None else dec.bias.detach()
                if in_pass:
                    mean, top1, e = pass_token_stats(out[2], rows, dec.weight.detach(), b,
                                                     dec.logit_scale, mask)
                else:
                    mean, top1, e = token_stats(rows, dec.weight.detach(), lab[:, 1:][mask], b,
                                                dec.softcap, dec.logit_scale, entropy=want_ent,
                                                backend=self._fd_backend)
                ent = _scatter(mask, e) if want_ent else None
                if want_tok:
                    mean_logits, is_top1 = _scatter(mask, mean), _scatter(mask, top1, torch.bool)
        pol = HeadPass(None, ent, mean_logits, is_top1, dec.aux_loss)
        return pol, loss, m["logps/chosen"], m["logps/rejected"]

    def _pair_loss(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   completion_mask, target_probs, reward_margins):
        """The loss from sequence log-probs (:func:`fastdpo.dpo_loss`)."""
        shift_completion_mask = completion_mask[..., 1:]
        types = tuple(self.loss_types)
        weights = tuple(self.loss_weights or (1.0,) * len(types))
        # TRL divides ipo / sigmoid_norm by the completion_mask count but sft by the shifted
        # (scored) count; they differ when a prompt is empty, so sft gets a call of its own.
        loss = 0.0
        for is_sft, count_mask in ((False, completion_mask), (True, shift_completion_mask)):
            group = [(t, w) for t, w in zip(types, weights) if (t == "sft") == is_sft]
            if not group:
                continue
            group_types, group_weights = (list(x) for x in zip(*group))
            chosen_lengths, rejected_lengths = count_mask.sum(dim=1).chunk(2, dim=0)
            part, _ = dpo_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                loss_type=group_types, loss_weights=group_weights,
                target_probs=target_probs if "soft" in group_types else None,
                reward_margins=reward_margins if "distill" in group_types else None,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                **self._loss_args(group_types))
            loss = loss + part
        return loss
