"""TRL's (experimental) CPO and ORPO trainers on fastdpo's fused LM head and losses.

Switch by changing one import::

    from fastdpo.integrations.trl_reference_free import FastCPOTrainer as CPOTrainer
    from fastdpo.integrations.trl_reference_free import FastORPOTrainer as ORPOTrainer

Both TRL trainers put the whole computation in two methods, which these subclasses override
(no patching): ``concatenated_forward`` runs the model's decoder only (``logits_to_keep`` empty)
and :func:`fastdpo.linear_token_logps` on the labelled positions, one pass giving the pair
log-probs and the NLL; ``cpo_loss`` / ``odds_ratio_loss`` are :func:`fastdpo.cpo_loss` /
:func:`fastdpo.orpo_loss` per pair (closed-form backward). TRL's ``get_batch_loss_metrics``
combines them unchanged, so the loss and every logged metric keep TRL's definitions:
``logits/chosen`` / ``logits/rejected`` (the mean of all logits of the padded batch) come from a
no-grad tiled pass over the LM head, never the full logits. Encoder-decoder models run TRL's code.

TRL KTO: TRL 1.16's ``KTOTrainer`` already scores through TRL's own fused LM head
(``add_fused_lm_head``) inside one monolithic ``_compute_loss``; there is no hook to override short
of rewriting that method, so use :class:`fastdpo.KTOLoss` / :func:`fastdpo.kto_loss` in your own
loop (``examples/reference_free_and_kto.py``).
"""

from __future__ import annotations

import torch

from ..linear import linear_token_logps
from ..losses import cpo_loss, orpo_loss
from .hf import head_params
from .trl_config import check_trl_version
from .trl_metrics import mean_logits

check_trl_version()

from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

__all__ = ["FastCPOTrainer", "FastORPOTrainer", "CPOConfig", "ORPOConfig"]


class _FusedConcatenatedForward:
    """``concatenated_forward`` through the fused LM head. Subclasses say which log-probs are
    per-token averages, which tokens the NLL covers and which positions' logits are logged."""

    _fd_logits_drop_last = False

    def _fd_average(self) -> bool:
        raise NotImplementedError

    def _fd_nll_labels(self, ids, attention_mask, labels):
        """Labels of the chosen NLL (``None``: no NLL term)."""
        raise NotImplementedError

    def concatenated_forward(self, model, batch):
        if self.is_encoder_decoder:
            return super().concatenated_forward(model, batch)
        pad = getattr(self, "padding_value", None)  # ORPO's attribute; CPO pads with pad_token_id
        cb = self.concatenated_inputs(batch, is_encoder_decoder=False,
                                      padding_value=self.pad_token_id if pad is None else pad,
                                      device=self.accelerator.device)
        n = batch["chosen_labels"].shape[0]
        ids, att, labels = (cb["concatenated_input_ids"], cb["concatenated_attention_mask"],
                            cb["concatenated_labels"])
        kw = {"output_router_logits": True} if self.aux_loss_enabled else {}
        # An empty index tensor: the model's own head scores no position, nothing kept for it.
        keep = torch.zeros(0, dtype=torch.long, device=ids.device)
        outputs = model(ids, attention_mask=att, use_cache=False, output_hidden_states=True,
                        logits_to_keep=keep, **kw)
        hidden = outputs.hidden_states[-1][:, -ids.shape[1]:]  # past PEFT's virtual tokens
        weight, bias, softcap, logit_scale = head_params(self.accelerator.unwrap_model(model))
        nll_labels = self._fd_nll_labels(ids[:n], att[:n], labels[:n])
        # one pass scores both: the NLL's labels agree with the pair labels where those are set
        pass_labels = labels if nll_labels is None else torch.cat([nll_labels, labels[n:]])
        tok = linear_token_logps(hidden, weight, pass_labels.to(weight.device), bias=bias,
                                 softcap=softcap, logit_scale=logit_scale, shift=True,
                                 backend=getattr(self.args, "fastdpo_backend", "auto"))
        mask = labels[:, 1:] != -100
        logps = torch.where(mask, tok, 0.0).sum(-1)
        if self._fd_average():
            logps = logps / mask.sum(-1)  # as TRL's get_batch_logps (no clamp)
        if nll_labels is None:
            nll = torch.zeros((), device=tok.device)
        else:
            nmask = nll_labels[:, 1:] != -100
            nll = -torch.where(nmask, tok[:n], 0.0).sum() / nmask.sum()
        with torch.no_grad():  # TRL logs the mean of every logit of the padded batch
            rows = hidden.detach().reshape(-1, hidden.shape[-1])
            mean = mean_logits(rows, weight.detach(), None if bias is None else bias.detach(),
                               softcap, logit_scale).view(hidden.shape[:2])
            if self._fd_logits_drop_last:  # ORPO logs the logits of the shifted positions
                mean = mean[:, :-1]
        out = (logps[:n], logps[n:], mean[:n].mean(), mean[n:].mean(), nll)
        return out + ((outputs.aux_loss,) if self.aux_loss_enabled else ())


class FastCPOTrainer(_FusedConcatenatedForward, CPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` (CPO, SimPO, AlphaPO) on fastdpo; same arguments."""

    _tag_names = ["trl", "cpo", "fastdpo"]

    def _fd_average(self):
        return self.loss_type in ("ipo", "simpo")

    def _fd_nll_labels(self, ids, attention_mask, labels):
        return None if self.cpo_alpha == 0 else labels

    def cpo_loss(self, policy_chosen_logps, policy_rejected_logps):
        smoothing = self.label_smoothing if self.loss_type in ("sigmoid", "simpo") else 0.0
        losses, m = cpo_loss(policy_chosen_logps, policy_rejected_logps, beta=self.beta,
                             loss_type=self.loss_type,
                             simpo_gamma=getattr(self, "simpo_gamma", 0.5), alpha=self.alpha,
                             label_smoothing=smoothing, cpo_alpha=0.0, reduction="none")
        return losses, m["rewards/chosen"], m["rewards/rejected"]


class FastORPOTrainer(_FusedConcatenatedForward, ORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` on fastdpo; same arguments."""

    _tag_names = ["trl", "orpo", "fastdpo"]
    _fd_logits_drop_last = True

    def _fd_average(self):
        return True

    def _fd_nll_labels(self, ids, attention_mask, labels):
        return ids.masked_fill(attention_mask == 0, -100)  # prompt and completion, as TRL

    def odds_ratio_loss(self, policy_chosen_logps, policy_rejected_logps):
        losses, m = orpo_loss(policy_chosen_logps, policy_rejected_logps, beta=self.beta,
                              nll_weight=0.0, reduction="none")
        # TRL returns beta * log sigmoid(log odds) and subtracts its mean
        return (-losses, m["rewards/chosen"], m["rewards/rejected"], m["log_odds_ratio"].mean(),
                m["log_odds_chosen"].mean())
