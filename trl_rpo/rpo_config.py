import math
from dataclasses import dataclass, field
from typing import Literal

from .losses import Estimator, SparsePromptStrategy, ValueShrinkage
from .rewarded_config import RewardedCompletionsConfig


@dataclass
class RPOConfig(RewardedCompletionsConfig):
    r"""
    Configuration class for the [`RPOTrainer`], which trains with Reward Partitioning Optimization (RPO, Faye, Azzag
    and Lebbah, [arXiv 2506.13702](https://huggingface.co/papers/2506.13702)).

    This RPO is *not* TRL's former `rpo_alpha` (DPO + NLL), NVIDIA's Reward-aware Preference Optimization or Relative
    Preference Optimization: it regresses the policy/reference log-ratio onto a target built from a scalar reward and
    a value V̂(x) estimated from the data itself (no value network, no pairs).

    `RPOConfig` subclasses [`~trl.KTOConfig`] (through `RewardedCompletionsConfig`, which holds the options it shares
    with [`DROConfig`]), so every KTO option that makes sense for RPO keeps its name, meaning
    and command-line flag, and a `KTOConfig(...)` call can be turned into `RPOConfig(...)` by renaming the class. KTO
    options that have no meaning for RPO are rejected with an error instead of being silently ignored. Only the
    parameters specific to RPO are listed below; see [`~trl.KTOConfig`] and [`~transformers.TrainingArguments`] for
    the others.

    Parameters:
        > Parameters that control the RPO objective

        beta (`float`, *optional*, defaults to `5.0`):
            Temperature τ of the KL-regularised objective: the policy is pulled towards π_ref(y|x)·exp(r/τ). Larger τ
            keeps the policy closer to the reference. Named `beta` like TRL's KL coefficient so that
            `KTOConfig(beta=…)` code keeps working. The default 5.0 is the value of the authors' released code.
        logps_aggregation (`str`, *optional*, defaults to `"mean"`):
            How token log-probabilities are aggregated into log π(y|x), used identically for the policy, the reference
            and inside the partition estimate: `"mean"` (mean over completion tokens, what the authors' code does) or
            `"sum"` (the sequence log-probability of the paper's derivation and of TRL's other trainers).
        partition_estimator (`str`, *optional*, defaults to `"empirical"`):
            Estimator of log Z(x): `"empirical"` (the paper's, logsumexp over the distinct completions of the prompt
            of log π_ref + r/τ) or `"monte_carlo"` (logsumexp of r/τ minus log n; consistent when the completions are
            samples of the reference policy). `"none"` sets V̂(x) = 0 (target r/τ): the paper's "RPO without
            normalisation" ablation, for studies only.
        reward_normalization (`str`, *optional*, defaults to `"global"`):
            `"global"`: z-score the rewards with the training split's mean and population standard deviation (as the
            authors do; evaluation splits reuse the training statistics; a constant reward is centred, not scaled).
            `"none"`: use the rewards as given. `"per_prompt"`: z-score inside each prompt group — a different method
            that re-weights prompts, offered for experiments.
        min_completions_per_prompt (`int`, *optional*, defaults to `2`):
            Minimum number of distinct completions (rows, for `"monte_carlo"`) a prompt needs for its own V̂(x). With a
            single completion the empirical target is −log π_ref(y|x) whatever the reward.
        sparse_prompt_strategy (`str`, *optional*, defaults to `"global_baseline"`):
            What to do with prompts below `min_completions_per_prompt`: `"global_baseline"` (use V̂_g = τ·log mean
            exp(r/τ) over all training rows), `"drop"` (remove their rows, counted in the logs) or `"error"`.

        > Parameters that control the level of the targets (see docs/loss.md, "The level of the target")

        partition_temperature (`float`, *optional*):
            Temperature τ_Z of the Monte-Carlo partition, separate from τ: V̂(x) = τ_Z·(logsumexp_j(r_j/τ_Z) − log n_x)
            and t = (r − V̂(x))/τ (A*PO's β₁ ≠ β₂). `None` uses τ (the plain target); `float("inf")` makes V̂(x) the
            prompt's mean reward, so that small τ sharpens the contrast between a prompt's completions without
            pushing every failure toward −1/τ. V̂_g (sparse prompts, shrinkage) uses τ_Z too. Needs
            `partition_estimator="monte_carlo"`.
        value_shrinkage (`str`, *optional*, defaults to `"none"`):
            `"empirical_bayes"` shrinks each prompt's V̂(x) toward the pooled V̂_g: w_x·V̂(x) + (1 − w_x)·V̂_g with the
            credibility weight w_x = n_x/(n_x + k), k the within-prompt over the between-prompt variance of the
            training rewards (Bühlmann–Straub; logged as `data/train_value_credibility`, the mean w_x, and `_k`).
            Prompts whose few samples say little borrow the pooled value; eval splits reuse the training k. Needs
            `partition_estimator="monte_carlo"`.
        level_weight (`float`, *optional*, defaults to `1.0`):
            λ in ½·Σ_x[Σ_j(δ_j − δ̄_x)² + λ·n_x·δ̄_x²] over the rows of each prompt in a batch (δ the residual, δ̄_x its
            prompt's mean). 1 is the plain loss; any λ > 0 keeps its minimum (δ = 0), λ < 1 lets the level of a
            prompt's log-ratios move less than their contrast. Needs `train_sampling_strategy="group_by_prompt"`
            and a batch size that is a multiple of the completions per prompt, so that batches hold whole prompts.
        huber_delta (`float`, *optional*):
            Replace the square of each row's residual δ by Huber's loss: ½δ² when |δ| ≤ huber_delta, else
            huber_delta·(|δ| − huber_delta/2). Same minimum (δ = 0); the gradient is δ clipped to ±huber_delta, so rows
            whose targets are out of reach (tens of nats at a small τ) pull no harder than the others. `None` (the
            default) keeps the square. Needs `level_weight=1`. An ablation; how it fared on the frontier benchmark:
            docs/benchmarks.md.

        > Parameters that control the reward (shared with [`DROConfig`])

        reward_columns (`list[str]`, *optional*):
            Build the reward from these columns instead of `reward` (or `rewards` with grouped rows, where each column
            holds one list per prompt): r = Σ_k weight_k · transform_k(column_k), computed before
            `reward_normalization`. E.g. HelpSteer2's five attributes. A `reward`/`rewards`/`label` column not listed
            makes the reward ambiguous and is an error.
        reward_column_weights (`list[float]`, *optional*):
            One weight per column of `reward_columns`; default 1 each.
        reward_column_transforms (`list[str]`, *optional*):
            One per column (or one for all): `"identity"` (default) or `"log1p"`, sign(x)·log(1 + |x|), for counts
            with a long tail such as votes.

        > Parameters that control the target pass

        cache_ref_log_probs (`bool`, *optional*, defaults to `True`):
            Cache the reference log-probs of each split on disk (next to the dataset's Arrow cache files, or under
            `$HF_DATASETS_CACHE/trl_rpo`), keyed by a digest of the reference weights, the model config, dtype,
            autocast and attention implementation, the token ids and `max_length`, so that a rerun on the same data
            and reference skips the reference pass. Files are written atomically; a log line (at `log_level="info"`)
            says hit or miss and where the file is. Targets are always recomputed from the log-probs.
        keep_ref_model (`bool`, *optional*, defaults to `False`):
            An explicit `ref_model` is only read by the target pass; by default it is then moved off the accelerator
            and dropped by the trainer (your own variable, if any, still holds it). Set `True` to keep it, e.g. to
            pass new datasets to `evaluate()` after construction.

        > Parameters that control the batches

        padding_free (`bool`, *optional*, defaults to `False`):
            Lay the rows of each micro-batch end to end in one sequence, with position ids restarting on each row and
            no pad token, in training and in the target pass; per-row log-probs are segment sums, so results equal the
            padded path's while no compute goes to padding. Causal models only, with an attention implementation that
            keeps packed rows apart (`"sdpa"`, `"eager"`, `"flex_attention"`, flash-attention); refused for
            encoder-decoder models, prompt-learning PEFT and a custom `data_collator`. See docs/throughput.md.

        > Parameters inherited from KTOConfig with a different default

        precompute_ref_log_probs (`bool`, *optional*, defaults to `True`):
            RPO always computes the reference log-probabilities and the targets once per split before training (Ẑ(x)
            needs every completion of a prompt). Setting it to `False` is an error.
        train_sampling_strategy (`str`, *optional*, defaults to `"random"`):
            Targets are stored per row, so batches may mix prompts freely; rows are shuffled like the authors' loader.
            `"group_by_prompt"` keeps each prompt's rows together (prompts shuffled, then their rows), which
            `level_weight` needs. `"group_by_length"` batches rows of similar length (the `length` column the target
            pass adds: tokens the model reads per row, after truncation).
        loss_type (`str`, *optional*, defaults to `"rpo"`):
            Only `"rpo"`. Kept so that configuration files written for KTO parse.

    > [!NOTE]
    > On a machine without a bf16-capable accelerator, `bf16` defaults to `False` instead of raising, so the same
    > script runs on a laptop CPU and on a GPU. Pass `bf16=True` with `use_cpu=True` to use bf16 on CPU. Under
    > DeepSpeed on a machine without an accelerator, `ddp_backend` defaults to `"gloo"` (DeepSpeed's CPU backend).
    """

    beta: float = field(
        default=5.0,
        metadata={
            "help": "Temperature τ of RPO: the policy is pulled towards π_ref·exp(r/τ); larger τ stays closer to the "
            "reference. Named `beta` like TRL's KL coefficient. Default 5.0, the authors' value."
        },
    )
    partition_estimator: Estimator = field(
        default="empirical",
        metadata={
            "help": "Estimator of log Z(x): 'empirical' (the paper's, over the prompt's distinct completions) or "
            "'monte_carlo' (logsumexp(r/τ) − log n, for completions sampled from the reference) or 'none' (V̂ = 0, the "
            "paper's ablation).",
        },
    )
    min_completions_per_prompt: int = field(
        default=2,
        metadata={
            "help": "Minimum number of distinct completions (rows for 'monte_carlo') a prompt needs for its own "
            "V̂(x); smaller groups follow `sparse_prompt_strategy`."
        },
    )
    sparse_prompt_strategy: SparsePromptStrategy = field(
        default="global_baseline",
        metadata={
            "help": "Prompts with too few completions: 'global_baseline' (V̂ over all training rows), 'drop' (rows "
            "removed and counted) or 'error'.",
        },
    )
    partition_temperature: float | None = field(
        default=None,
        metadata={
            "help": "Temperature τ_Z of the Monte-Carlo partition: V̂(x) = τ_Z·(logsumexp(r/τ_Z) − log n), targets "
            "(r − V̂)/τ. Default: τ (`beta`). 'inf' makes V̂(x) the prompt's mean reward. 'monte_carlo' only."
        },
    )
    value_shrinkage: ValueShrinkage = field(
        default="none",
        metadata={
            "help": "'empirical_bayes': shrink each prompt's V̂(x) toward the pooled V̂_g with the credibility weight "
            "n/(n + k), k = within-prompt / between-prompt reward variance (logged). 'monte_carlo' only."
        },
    )
    level_weight: float = field(
        default=1.0,
        metadata={
            "help": "λ: weight of each prompt's mean residual in the loss, ½Σ_x[Σ_j(δ_j − δ̄_x)² + λ·n_x·δ̄_x²]; 1 is "
            "the plain loss. Other values need train_sampling_strategy='group_by_prompt'."
        },
    )
    huber_delta: float | None = field(
        default=None,
        metadata={
            "help": "Huber threshold on each row's residual (nats): its gradient is clipped to ±huber_delta. None: "
            "the squared residual. Needs level_weight=1."
        },
    )
    loss_type: Literal["rpo"] = field(
        default="rpo", metadata={"help": "Only 'rpo'; kept so that KTO configuration files parse."}
    )

    def _check_options(self) -> None:
        if not (isinstance(self.min_completions_per_prompt, int) and self.min_completions_per_prompt >= 1):
            raise ValueError(
                f"`min_completions_per_prompt` must be an integer ≥ 1, got {self.min_completions_per_prompt!r}."
            )
        level_options = self.partition_temperature is not None or self.value_shrinkage != "none"
        if level_options and self.partition_estimator != "monte_carlo":
            raise ValueError(
                "`partition_temperature` and `value_shrinkage` set the level of the Monte-Carlo partition; got "
                f"`partition_estimator={self.partition_estimator!r}`. Set `partition_estimator='monte_carlo'` (its "
                "completions should be samples of the reference), or remove them."
            )
        tau_z = self.partition_temperature
        if tau_z is not None and (isinstance(tau_z, bool) or not isinstance(tau_z, int | float) or not tau_z > 0):
            raise ValueError(f"`partition_temperature` must be a number > 0 ('inf' allowed), got {tau_z!r}.")
        weight = self.level_weight
        finite = isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight)
        if not (finite and weight >= 0):
            raise ValueError(f"`level_weight` must be a finite number ≥ 0, got {weight!r}.")
        delta = self.huber_delta
        if delta is not None and (
            isinstance(delta, bool) or not isinstance(delta, int | float) or not (math.isfinite(delta) and delta > 0)
        ):
            raise ValueError(f"`huber_delta` must be a finite number > 0 (or None), got {delta!r}.")
        if delta is not None and weight != 1:
            raise ValueError(
                f"`huber_delta={delta}` applies to the whole residual; `level_weight={weight}` splits it. Use one."
            )
        if weight != 1 and self.train_sampling_strategy != "group_by_prompt":
            raise ValueError(
                f"`level_weight={weight}` weighs each prompt's mean residual within a batch, so a batch must hold "
                "the prompt's rows together: set `train_sampling_strategy='group_by_prompt'` (and a batch size that "
                "is a multiple of the completions per prompt), or keep `level_weight=1`."
            )
