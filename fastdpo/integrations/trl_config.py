"""TRL version check, :class:`FastDPOConfig` and the reward-columns collator of
:class:`fastdpo.integrations.trl.FastDPOTrainer` (imported from there)."""

from __future__ import annotations

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

from trl import DPOConfig  # noqa: E402  (after the version check)

TARGET_LOSS_TYPES = ("soft", "distill")


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
                                        "completions), with nothing kept for backward: in "
                                        "the log-prob pass (frozen head), or in the no-grad "
                                        "pass of token_metrics (one LM-head matmul over the "
                                        "completion tokens if that is off); set False to skip "
                                        "them."})
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
