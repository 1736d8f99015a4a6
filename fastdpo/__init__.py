"""fastdpo: log-probabilities and DPO-family losses without the softmax tensor."""

from . import ops  # noqa: F401  (defines the operator schemas)
from .logps import sequence_logps, token_logps

__version__ = "0.1.0"

__all__ = ["token_logps", "sequence_logps", "__version__"]
