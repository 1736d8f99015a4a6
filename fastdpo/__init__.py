"""fastdpo: log-probabilities and DPO-family losses without the softmax tensor."""

from . import ops  # noqa: F401  (defines the operator schemas)
from .autograd.workspace import Workspace
from .linear import linear_sequence_logps, linear_token_logps
from .logps import sequence_logps, token_logps
from .losses import (
    LOSS_TYPES,
    CPOLoss,
    DPOLoss,
    KTOLoss,
    ORPOLoss,
    PreferencePairs,
    PreferenceTargets,
    build_pairs,
    cpo_loss,
    dpo_loss,
    kto_loss,
    linear_cpo_loss,
    linear_dpo_loss,
    linear_kto_loss,
    linear_orpo_loss,
    linear_pair_logps,
    orpo_loss,
    preference_probs,
    rejection_sample,
)
from .integrations.reference import precompute_reference  # torch + fastdpo only

__version__ = "0.2.0"

__all__ = [
    "token_logps", "sequence_logps", "linear_token_logps", "linear_sequence_logps",
    "linear_dpo_loss", "linear_cpo_loss", "linear_orpo_loss", "linear_kto_loss",
    "linear_pair_logps",
    "dpo_loss", "DPOLoss", "LOSS_TYPES", "cpo_loss", "orpo_loss", "kto_loss", "CPOLoss",
    "ORPOLoss", "KTOLoss", "preference_probs", "PreferenceTargets",
    "rejection_sample", "build_pairs", "PreferencePairs",
    "precompute_reference", "Workspace",
    "__version__",
]
