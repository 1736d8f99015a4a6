"""fastdpo: log-probabilities and DPO-family losses without the softmax tensor."""

from . import ops  # noqa: F401  (defines the operator schemas)
from .linear import linear_sequence_logps, linear_token_logps
from .logps import sequence_logps, token_logps
from .losses import (
    LOSS_TYPES,
    DPOLoss,
    PreferencePairs,
    PreferenceTargets,
    build_pairs,
    dpo_loss,
    preference_probs,
    rejection_sample,
)

__version__ = "0.1.0"

__all__ = [
    "token_logps", "sequence_logps", "linear_token_logps", "linear_sequence_logps",
    "dpo_loss", "DPOLoss", "LOSS_TYPES", "preference_probs", "PreferenceTargets",
    "rejection_sample", "build_pairs", "PreferencePairs",
    "__version__",
]
