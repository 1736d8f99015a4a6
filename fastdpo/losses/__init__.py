"""DPO-family losses with closed-form backward (DPO, CPO/SimPO/AlphaPO, ORPO, KTO), reward-model
targets, and the ``DPOLoss`` module."""

from .dpo import RewardRunningMean, dpo_loss, preference_metrics
from .family_modules import CPOLoss, KTOLoss, ORPOLoss
from .formulas import CPO_LOSS_TYPES, KTO_LOSS_TYPES
from .fused_linear import linear_dpo_loss, linear_pair_logps
from .fused_linear_family import linear_cpo_loss, linear_kto_loss, linear_orpo_loss
from .functional import LOSS_TYPES, TRL_LOSS_TYPES
from .kto import kto_loss
from .module import DPOLoss
from .preference import (PreferencePairs, PreferenceTargets, RejectionSample, build_pairs,
                         preference_probs, rejection_sample)
from .reference_free import cpo_loss, orpo_loss

__all__ = ["dpo_loss", "DPOLoss", "preference_probs", "rejection_sample", "build_pairs",
           "PreferenceTargets", "PreferencePairs", "RejectionSample", "RewardRunningMean",
           "preference_metrics", "LOSS_TYPES", "TRL_LOSS_TYPES", "cpo_loss", "orpo_loss",
           "kto_loss", "linear_dpo_loss", "linear_pair_logps", "linear_cpo_loss",
           "linear_orpo_loss", "linear_kto_loss",
           "CPO_LOSS_TYPES", "KTO_LOSS_TYPES", "CPOLoss", "ORPOLoss", "KTOLoss"]
