"""trl_rpo: Reward Partitioning Optimization (Faye, Azzag and Lebbah, arXiv 2506.13702) for Hugging Face TRL.

Not TRL's former `rpo_alpha` (DPO + NLL), NVIDIA's Reward-aware PO or Relative PO.
"""

from .dro_config import DROConfig
from .dro_trainer import DROTrainer
from .generation import generate_completions
from .iterate import iterate_rpo
from .losses import (
    DROLossOutput,
    RewardStats,
    RPOLossOutput,
    RPOTargets,
    credibility,
    dro_loss,
    normalize_rewards,
    pairwise_ranking_counts,
    rpo_loss,
    rpo_targets,
    segment_logsumexp,
    target_level_split,
)
from .rpo_config import RPOConfig
from .rpo_trainer import RPOTrainer
from .scoring import score_completions
from .version import __version__


__all__ = [
    "DROConfig",
    "DROLossOutput",
    "DROTrainer",
    "RPOConfig",
    "RPOLossOutput",
    "RPOTargets",
    "RPOTrainer",
    "RewardStats",
    "__version__",
    "credibility",
    "dro_loss",
    "generate_completions",
    "iterate_rpo",
    "normalize_rewards",
    "pairwise_ranking_counts",
    "rpo_loss",
    "rpo_targets",
    "score_completions",
    "segment_logsumexp",
    "target_level_split",
]
