"""TRL integration: :class:`FastDPOTrainer`, a drop-in ``trl.DPOTrainer`` on fastdpo's kernels.

Switch by changing one import::

    from fastdpo.integrations.trl import FastDPOTrainer as DPOTrainer

Same constructor, same ``DPOConfig`` (or :class:`FastDPOConfig` for the extra options), same
logged metrics. What changes inside ``_compute_loss`` / ``compute_ref_log_probs``:

* policy and reference log-probs come from fastdpo's fused LM head
  (:func:`fastdpo.linear.linear_token_logps`) on the completion positions only, so neither the
  logits nor a copy of the prompt positions' hidden states is kept for backward;
* the loss is :func:`fastdpo.dpo_loss` (closed-form backward), which adds two loss types to
  TRL's: ``soft`` (soft-label DPO, target = P(chosen beats rejected)) and ``distill`` (regress
  the implicit reward margin on the reward model's margin). Their targets come from reward
  columns of the dataset (``chosen_reward`` / ``rejected_reward``: a number, or a list of numbers
  for an ensemble of reward models) through :func:`fastdpo.preference_probs`.

The policy's forward goes through the (possibly DDP/FSDP-wrapped) model's own ``forward`` with
``output_hidden_states=True, logits_to_keep=1``, so wrappers see their usual forward (DDP's
gradient hooks, FSDP's unsharding); logits are formed for one position per sequence only.

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
from dataclasses import dataclass, field

import torch

try:
    import trl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastdpo.integrations.trl needs TRL: pip install 'trl>=1.15,<1.17'") from exc

from packaging.version import Version

SUPPORTED_TRL = ((1, 15), (1, 16))  # (major, minor) series whose DPOTrainer internals were checked


def check_trl_version(version: str | None = None) -> None:
    """Raise ImportError unless ``version`` (default: the installed TRL) is a supported series."""
    v = Version(version or trl.__version__)
    if v.release[:2] not in SUPPORTED_TRL:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_TRL)
        raise ImportError(
            f"fastdpo.integrations.trl supports TRL {supported}; found trl=={v}. FastDPOTrainer "
            f"overrides DPOTrainer internals (_compute_loss, compute_ref_log_probs, the "
            f"collator) that change between TRL releases: install a supported TRL "
            f"(pip install 'trl>=1.15,<1.17') or use fastdpo.dpo_loss / "
            f"fastdpo.linear.linear_sequence_logps directly in your own loop.")


check_trl_version()

from accelerate.utils import is_peft_model  # noqa: E402  (after the version check)
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from ..linear import linear_token_logps  # noqa: E402
from ..rows import transform_logits_  # noqa: E402
from ..losses import dpo_loss, preference_probs  # noqa: E402
from ..losses.functional import LABEL_SMOOTHING_TYPES  # noqa: E402
from .hf import head_params, lm_head_inputs  # noqa: E402
from .reference import StoredReference  # noqa: E402

__all__ = ["FastDPOTrainer", "FastDPOConfig", "RewardColumnsCollator", "check_trl_version"]

TARGET_LOSS_TYPES = ("soft", "distill")
# fp32 bytes of one logits tile in the (optional) no-grad pass for TRL's token metrics
_METRIC_TILE_BYTES = 32 << 20


@dataclass
class FastDPOConfig(DPOConfig):
    """``trl.DPOConfig`` plus fastdpo's options (a plain ``DPOConfig`` gets these defaults)."""

    fastdpo_backend: str = field(
        default="auto", metadata={"help": "fastdpo backend: auto, torch, triton or native."})
    reward_columns: list[str] = field(
        default_factory=lambda: ["chosen_reward", "rejected_reward"],
        metadata={"help": "Dataset columns with the reward of the chosen and rejected completion "
                          "(a number, or a list for an ensemble of reward models); targets of the "
                          "'soft' and 'distill' loss types."})
    reward_temperature: float = field(
        default=1.0, metadata={"help": "Bradley-Terry temperature of the reward margins."})
    reward_ensemble: str = field(
        default="mean_prob", metadata={"help": "How ensemble members combine: mean_prob, "
                                               "mean_margin, lower_quantile, mean_minus_std."})
    entropy_metrics: bool = field(
        default=True, metadata={"help": "Log TRL's entropy and entropy/chosen, entropy/rejected "
                                        "(token means of the softmax entropy over each side's "
                                        "completions), computed in the log-prob pass with "
                                        "nothing kept for backward; set False to skip them."})
    token_metrics: bool = field(
        default=True, metadata={"help": "Log TRL's logits/chosen, logits/rejected and "
                                        "mean_token_accuracy. They need the max and mean over "
                                        "the vocabulary, one extra no-grad LM-head pass over the "
                                        "completion tokens; set False to skip it."})


@dataclass
class RewardColumnsCollator:
    """Runs ``base`` and adds the reward columns as float tensors: ``(B,)``, or ``(B, E)`` when
    each example holds a list of ``E`` ensemble rewards. TRL's preference collator drops every
    key it does not know, so the columns would not reach the loss otherwise."""

    base: object
    columns: tuple[str, ...]

    def __call__(self, examples):
        out = self.base(examples)
        for c in self.columns:
            if c in examples[0]:
                out[c] = torch.tensor([ex[c] for ex in examples], dtype=torch.float32)
        return out


@dataclass
class _HeadPass:
    logps: torch.Tensor                  # (B, T-1), 0 outside the completion
    entropy: torch.Tensor | None         # (B, T-1) detached
    mean_logits: torch.Tensor | None     # (B, T-1) detached
    is_top1: torch.Tensor | None         # (B, T-1) bool
    aux_loss: torch.Tensor | None        # MoE router loss of the forward, when it computed one


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

    def _head_pass(self, model, model_kwargs, labels, *, policy: bool, stats: bool) -> _HeadPass:
        """Per-token log-probs of ``labels`` (prompt and padding = -100) under ``model``."""
        # Mixed precision: accelerate runs a prepared model's forward under autocast; run the
        # decoder-only reference call and the LM head under the same autocast so that policy,
        # reference and TRL's own head see the same precision.
        with self.accelerator.autocast():
            return self._head_pass_impl(model, model_kwargs, labels, policy=policy, stats=stats)

    def _head_pass_impl(self, model, model_kwargs, labels, *, policy, stats):
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
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100
        # Only completion positions: the prompt/padding rows' hidden states are not kept for
        # backward (the compaction costs one host sync for the row count, as in TRL on GPU).
        rows = hidden[:, :-1][mask].to(weight.device)
        lab = shift_labels[mask].to(weight.device)
        kw = dict(bias=bias, softcap=softcap, logit_scale=logit_scale, backend=self._fd_backend)
        want_entropy = stats and getattr(self.args, "entropy_metrics", True)
        # the entropy is a metric: "detached" keeps a frozen (LoRA) head's 2-matmul path
        out = linear_token_logps(rows, weight, lab,
                                 return_entropy="detached" if want_entropy else False, **kw)
        lp, ent = out if want_entropy else (out, None)

        def scatter(x, dtype=None):
            z = torch.zeros(mask.shape, dtype=dtype or x.dtype, device=x.device)
            return z.masked_scatter(mask.to(x.device), x)

        # masked_scatter keeps an all-prompt batch connected to the graph (a zero gradient)
        per_token = scatter(lp)
        mean_logits = is_top1 = None
        if stats and getattr(self.args, "token_metrics", True):
            m, t1 = _logit_stats(rows.detach(), weight.detach(), lab,
                                 None if bias is None else bias.detach(), softcap, logit_scale)
            mean_logits, is_top1 = scatter(m), scatter(t1, torch.bool)
        # keep only the aux loss of the outputs: not the tuple of every layer's hidden states
        return _HeadPass(per_token, None if ent is None else scatter(ent.detach()), mean_logits,
                         is_top1, getattr(outputs, "aux_loss", None))

    def _sequence_logps(self, per_token, shift_completion_mask):
        """Sum over the completion, or TRL's LD-DPO weighting of the tokens past the shorter
        completion of the pair (``ld_alpha``)."""
        if self.ld_alpha is None:
            return per_token.sum(dim=1)
        pos = shift_completion_mask.cumsum(dim=1)
        lens = shift_completion_mask.sum(dim=1).long()
        chosen_lens, rejected_lens = lens.chunk(2, dim=0)
        shared = torch.minimum(chosen_lens, rejected_lens).repeat(2).unsqueeze(1)
        in_shared = (pos > 0) & (pos <= shared)
        tail = pos > shared
        return (per_token * in_shared).sum(dim=1) + self.ld_alpha * (per_token * tail).sum(dim=1)

    def _reference_logps(self, model, inputs, model_kwargs, labels):
        shift_completion_mask = inputs["completion_mask"][..., 1:]
        with torch.no_grad(), disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):
                # the adapter-disabled policy, also when the precompute pass passes it as `model`
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=adapter):
                    ref = self._head_pass(self.model if model is None else model, model_kwargs,
                                          labels, policy=False, stats=False)
            else:
                ref = self._head_pass(model if model is not None else self.ref_model,
                                      model_kwargs, labels, policy=False, stats=False)
        return self._sequence_logps(ref.logps, shift_completion_mask).chunk(2, dim=0)

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

        pol = self._head_pass(model, model_kwargs, labels, policy=True, stats=True)
        logps = self._sequence_logps(pol.logps, shift_completion_mask)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # the batch is [chosen; rejected]
        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = (inputs["ref_chosen_logps"],
                                                    inputs["ref_rejected_logps"])
        else:
            ref_chosen_logps, ref_rejected_logps = self._reference_logps(
                self.ref_model, inputs, ref_kwargs, labels)
        ref_chosen_logps = ref_chosen_logps.to(chosen_logps)
        ref_rejected_logps = ref_rejected_logps.to(chosen_logps)

        target_probs, reward_margins = self._targets(inputs)
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
            uses_smoothing = any(t in LABEL_SMOOTHING_TYPES for t in group_types)
            part, _ = dpo_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=self.beta, loss_type=group_types, loss_weights=group_weights,
                label_smoothing=self.label_smoothing if uses_smoothing else 0.0,
                target_probs=target_probs if "soft" in group_types else None,
                reward_margins=reward_margins if "distill" in group_types else None,
                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                discopop_tau=self.args.discopop_tau, f_divergence_type=self.f_divergence_type,
                f_alpha_divergence_coef=self.f_alpha_divergence_coef)
            loss = loss + part

        if self.aux_loss_enabled:
            aux_loss = pol.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_metrics(mode, inputs, pol, shift_completion_mask, chosen_logps, rejected_logps,
                          ref_chosen_logps, ref_rejected_logps, target_probs)
        return loss

    # ------------------------------------------------------------------ metrics (TRL's names)

    def _log_metrics(self, mode, inputs, pol, mask, chosen_logps, rejected_logps,
                     ref_chosen_logps, ref_rejected_logps, target_probs):
        acc = self.accelerator
        metrics = self._metrics[mode]

        def gathered_sum(x):
            return acc.gather_for_metrics(x).sum()

        def ratio(num, den):
            num, den = gathered_sum(num).item(), gathered_sum(den).item()
            return num / den if den > 0 else 0.0

        if pol.entropy is not None:
            metrics["entropy"].append(ratio((pol.entropy * mask).sum(), mask.sum()))
            for side, ent, m in zip(("chosen", "rejected"), pol.entropy.chunk(2, dim=0),
                                    mask.chunk(2, dim=0)):
                metrics[f"entropy/{side}"].append(ratio((ent * m).sum(), m.sum()))
        if mode == "train":
            n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        if pol.mean_logits is not None:
            mean_c, mean_r = pol.mean_logits.chunk(2, dim=0)
            metrics["logits/chosen"].append(ratio((mean_c * chosen_mask).sum(), chosen_mask.sum()))
            metrics["logits/rejected"].append(ratio((mean_r * rejected_mask).sum(),
                                                    rejected_mask.sum()))
            top1_c, _ = pol.is_top1.chunk(2, dim=0)
            metrics["mean_token_accuracy"].append(
                ratio((top1_c & chosen_mask.bool()).sum(), chosen_mask.sum()))
        chosen_rewards = self.beta * (chosen_logps.detach() - ref_chosen_logps)
        rejected_rewards = self.beta * (rejected_logps.detach() - ref_rejected_logps)
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(
            acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(
            acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())
        if target_probs is not None:
            metrics["targets/probs"].append(acc.gather(target_probs.detach()).mean().item())


@torch.no_grad()
def _logit_stats(rows, weight, labels, bias, softcap, logit_scale):
    """Per row: the mean logit over the vocabulary and whether the label is the (first) argmax,
    computed in row blocks whose fp32 logits stay under ``_METRIC_TILE_BYTES``."""
    N, V = rows.shape[0], weight.shape[0]
    mean = torch.empty(N, dtype=torch.float32, device=rows.device)
    top1 = torch.empty(N, dtype=torch.bool, device=rows.device)
    step = max(1, _METRIC_TILE_BYTES // (4 * V))
    for i in range(0, N, step):
        z = (rows[i:i + step].to(weight.dtype) @ weight.t()).float()
        if bias is not None:
            z += bias.float()
        z = transform_logits_(z, logit_scale, softcap or 0.0)
        mean[i:i + step] = z.mean(-1)
        top1[i:i + step] = z.argmax(-1) == labels[i:i + step]
    return mean, top1
