"""DPO-family losses with closed-form backward, reward-model targets, and the ``DPOLoss`` module."""

from .dpo import RewardRunningMean, dpo_loss, preference_metrics
from .functional import LOSS_TYPES, TRL_LOSS_TYPES
from .module import DPOLoss
from .preference import (PreferencePairs, PreferenceTargets, RejectionSample, build_pairs,
                         preference_probs, rejection_sample)

__all__ = ["dpo_loss", "DPOLoss", "preference_probs", "rejection_sample", "build_pairs",
           "PreferenceTargets", "PreferencePairs", "RejectionSample", "RewardRunningMean",
           "preference_metrics", "LOSS_TYPES", "TRL_LOSS_TYPES"]
