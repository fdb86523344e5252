import math
from dataclasses import dataclass, field
from typing import Literal

from .rewarded_config import RewardedCompletionsConfig


@dataclass
class DROConfig(RewardedCompletionsConfig):
    r"""
    Configuration class for the [`DROTrainer`], the Direct Reward Optimisation baseline (DRO-V, Richemond et al.,
    "Offline Regularised Reinforcement Learning for Large Language Models Alignment",
    [arXiv 2405.19107](https://huggingface.co/papers/2405.19107)).

    DRO minimises, jointly over the policy π_θ and a learned value V_φ(x),
    ½·mean_j (r_j − V_φ(x_j) − τ·(log π_θ(y_j|x_j) − log π_ref(y_j|x_j)))². It shares RPO's data formats, reward
    normalisation, log-prob aggregation and reference pass; only the value differs: RPO estimates V̂(x) from the
    completions of each prompt, DRO learns it, so a prompt with a single completion is trained like any other (and
    RPO's `partition_estimator`, `min_completions_per_prompt` and `sparse_prompt_strategy` do not exist here). The
    options shared with [`RPOConfig`] (`logps_aggregation`, `reward_normalization`, `cache_ref_log_probs`,
    `keep_ref_model`, and KTOConfig's) are documented there; only DRO's own are listed below.

    Parameters:
        beta (`float`, *optional*, defaults to `1.0`):
            Temperature τ. 1.0 is the value of the DRO baseline released with the RPO paper (RPO uses 5.0).
        value_model_type (`str`, *optional*, defaults to `"shared"`):
            How V_φ(x) is computed. `"shared"`: a linear head on the policy's final hidden state at the last prompt
            token (the encoder's last prompt token for an encoder-decoder policy). No extra model and no extra
            forward, but the value gradients flow into the shared backbone (or LoRA adapter), as in the DRO
            baseline of the RPO authors. `"separate"`: a model of its own (`value_model_name_or_path`, loaded with
            `AutoModel`, its encoder only for an encoder-decoder) with a linear head on the mean of its final hidden
            states over the prompt tokens; its gradients stay in it. Both heads start at zero, so V_φ = 0 at step 0.
        value_model_name_or_path (`str`, *optional*, defaults to `None`):
            Model of the `"separate"` value network. `None` uses the policy's path. It must use the policy's
            tokenizer (it reads the policy's token ids). An error with `"shared"`.
        value_learning_rate (`float`, *optional*, defaults to `None`):
            Learning rate of the value parameters (head, and backbone for `"separate"`), in an optimizer parameter
            group of their own that follows the same schedule. `None` uses `learning_rate`.
        rescale_policy_lr (`bool`, *optional*, defaults to `False`):
            Divide the policy's learning rate by τ, as two public DRO-V implementations do: the policy gradient of
            the loss carries a factor τ, so this keeps the policy's step size comparable across τ. The value
            learning rate is never rescaled.
        loss_type (`str`, *optional*, defaults to `"dro"`):
            Only `"dro"`. Kept so that configuration files written for KTO parse.
    """

    beta: float = field(
        default=1.0,
        metadata={
            "help": "Temperature τ of DRO (named `beta` like TRL's KL coefficient). Default 1.0, the value of the "
            "DRO baseline released with the RPO paper."
        },
    )
    value_model_type: Literal["shared", "separate"] = field(
        default="shared",
        metadata={
            "help": "'shared': linear head on the policy's last prompt-token hidden state (value gradients reach "
            "the policy backbone); 'separate': `value_model_name_or_path` + linear head on mean-pooled prompt "
            "states.",
        },
    )
    value_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model of the 'separate' value network (the policy's tokenizer); default: the policy."},
    )
    value_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the value parameters (own optimizer group); default: `learning_rate`."},
    )
    rescale_policy_lr: bool = field(
        default=False,
        metadata={"help": "Divide the policy's learning rate by τ (as some DRO-V implementations do)."},
    )
    loss_type: Literal["dro"] = field(
        default="dro", metadata={"help": "Only 'dro'; kept so that KTO configuration files parse."}
    )

    def _check_options(self) -> None:
        if self.padding_free:
            raise ValueError(
                "`padding_free=True` is not supported by DROConfig: the value network reads the prompts as a padded "
                "batch. Remove `padding_free` (or use RPOConfig)."
            )
        if self.value_model_type == "shared" and self.value_model_name_or_path is not None:
            raise ValueError(
                "`value_model_name_or_path` is only used with `value_model_type='separate'`; the 'shared' value head "
                "reads the policy's hidden states. Remove it or set `value_model_type='separate'`."
            )
        lr = self.value_learning_rate
        if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"`value_learning_rate` must be a finite number ≥ 0 or None, got {lr!r}.")
