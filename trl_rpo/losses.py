r"""Pure tensor maths of Reward Partitioning Optimization (RPO; Faye et al., 2025, arXiv:2506.13702).

Glossary: ``x`` a prompt; ``y_j`` the completion of row ``j``; ``r_j`` its (normalised) scalar reward;
``l_j = log pi_ref(y_j|x)`` and ``p_j = log pi_theta(y_j|x)`` its reference / policy log-probs, already
aggregated over tokens by the caller (``LOGPS_AGGREGATIONS``); ``tau = beta > 0`` the temperature; ``n_x`` the
rows of prompt ``x``; ``N`` all rows.

The KL-regularised optimum is ``pi*(y|x) = pi_ref(y|x) exp(r(x, y)/tau) / Z(x)``, so the optimal log-ratio is
``t(x, y) = (r(x, y) - V(x)) / tau`` with ``V(x) = tau log Z(x)``. The partition function is estimated by

* ``"empirical"``:   ``log Z(x) = logsumexp_{distinct y_j of x} (l_j + r_j / tau)`` -- a duplicated completion
  enters once, with the mean of its rows' rewards (and of their ref log-probs);
* ``"monte_carlo"``: ``log Z(x) = logsumexp_{rows j of x} (r_j / tau) - log n_x``, i.e. ``y_j ~ pi_ref``;
* ``"none"``:        ``log Z(x) = 0``, i.e. ``V(x) = 0`` -- no partition at all, the "RPO without normalisation"
  ablation of the paper, kept to measure what the partition buys (no prompt is ever sparse).

The loss regresses the policy log-ratio on that target, ``V`` and ``l`` being constants::

    delta_j = (p_j - l_j) - t_j,        L = 0.5 * mean_j delta_j ** 2

Every target splits into a *contrast* ``(r_j - rbar_x) / tau``, the same for every estimator, and a *level*
``(rbar_x - V(x)) / tau`` that the partition estimate sets. Three options control the level without leaving RPO's
framing (each defaults to the plain objective above):

* a partition temperature ``tau_Z`` (``"monte_carlo"`` only): ``V(x) = tau_Z (logsumexp_j (r_j / tau_Z) - log n_x)``
  and ``t_j = (r_j - V(x)) / tau``; ``tau_Z = tau`` is the plain target, ``tau_Z = inf`` gives ``V(x) = rbar_x``;
* empirical-Bayes shrinkage (``"monte_carlo"`` only): ``V(x) <- w_x V(x) + (1 - w_x) V_g`` with the credibility
  weight ``w_x = n_x / (n_x + k)``, ``k`` the ratio of the within-prompt to the between-prompt reward variance
  (Buhlmann-Straub), so that a prompt whose few samples say little borrows the pooled value;
* a level weight ``lambda`` in the loss, over the rows of each prompt in a batch of ``B`` rows:
  ``L = 0.5 / B * sum_x [sum_j (delta_j - dbar_x) ** 2 + lambda n_x dbar_x ** 2]``; ``lambda = 1`` is the plain
  loss, and for any ``lambda > 0`` the minimum is still ``delta = 0``, so the optimum is RPO's wherever the
  targets are reachable.

A prompt with fewer than ``min_completions_per_prompt`` completions cannot be normalised (with one completion the
empirical target is ``-l_j``: it asks ``pi_theta(y_j|x) = 1``). Its rows use the global baseline
``V_g = tau (logsumexp_{i <= N} (r_i / tau) - log N)``, are dropped, or raise (``sparse_prompt_strategy``).

``beta`` is named like TRL's KL coefficient; here it *is* the temperature ``tau``. The defaults (``beta=5.0``,
mean-token log-probs, global z-scored rewards with population std, ``"empirical"``) reproduce the authors'
released code (github.com/b-faye/rpo) on data where each prompt has at least two distinct completions and no
duplicated one; that code counts a duplicated completion once per row, leaves single-completion prompts
degenerate and adds ``1e-8`` to the reward std. All partition maths runs in float64 through a max-shifted
segment logsumexp, so ``exp(l)`` is never formed and extreme log-probs / rewards stay finite.

``dro_loss`` is the objective of the DRO baseline (Richemond et al., 2024, arXiv:2405.19107), which learns
``V_phi(x)`` instead of estimating it: ``L = 0.5 * mean_j (r_j - V_phi(x_j) - tau (p_j - l_j)) ** 2``.
"""

import math
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor


# The choices, typed once: the configs' options use these aliases, and the checks read their values.
Estimator = Literal["empirical", "monte_carlo", "none"]
ValueShrinkage = Literal["none", "empirical_bayes"]
RewardNormalization = Literal["global", "none", "per_prompt"]
SparsePromptStrategy = Literal["global_baseline", "drop", "error"]
LogpsAggregation = Literal["mean", "sum"]
ESTIMATORS = get_args(Estimator)
VALUE_SHRINKAGES = get_args(ValueShrinkage)
REWARD_NORMALIZATIONS = get_args(RewardNormalization)
SPARSE_PROMPT_STRATEGIES = get_args(SparsePromptStrategy)
LOGPS_AGGREGATIONS = get_args(LogpsAggregation)

# A std this small relative to the mean is rounding noise of a constant column, not signal.
_CONSTANT_RTOL = 1e-12
# Pair comparisons held in memory at once by `pairwise_ranking_counts` (booleans and floats: ~100 MB).
# Implicit rewards closer than this are a tie in `pairwise_ranking_counts`: 1e-4 nats is a probability ratio of
# 1.0001, far below any preference, and far above the float32 noise between two computations of the same log-ratio.
RANKING_TIE_TOLERANCE = 1e-4
_PAIR_CHUNK = 1 << 22


class RewardStats(NamedTuple):
    mean: float
    scale: float
    constant: bool


class RPOTargets(NamedTuple):
    targets: Tensor
    values: Tensor
    sparse: Tensor
    keep: Tensor
    global_value: float
    credibility_k: float = math.nan  # k of w_x = n_x / (n_x + k) when the values were shrunk, else NaN


class RPOLossOutput(NamedTuple):
    losses: Tensor
    log_ratios: Tensor
    residuals: Tensor


class DROLossOutput(NamedTuple):
    losses: Tensor
    log_ratios: Tensor
    residuals: Tensor


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}.")


def _first_rows(mask: Tensor, limit: int = 5) -> list[int]:
    return mask.nonzero().flatten()[:limit].tolist()


def _check_finite(name: str, values: Tensor, hint: str) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} row(s) have a non-finite {name} (first rows: {_first_rows(bad)}); {hint}")


def segment_logsumexp(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    r"""``out[s] = log sum_{i: seg_i = s} exp(v_i)`` in float64, shifted by each segment's max.

    ``segment_ids`` must be dense in ``[0, num_segments)``; an empty segment gives ``-inf``.
    """
    values = values.to(torch.float64)
    segment_ids = segment_ids.to(values.device)
    seg_max = torch.full((num_segments,), -math.inf, dtype=torch.float64, device=values.device)
    seg_max.scatter_reduce_(0, segment_ids, values, reduce="amax", include_self=True)
    # An all -inf (or empty) segment has no finite shift; 0 keeps exp() at 0 and the result at -inf.
    shift = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    sums = torch.zeros_like(seg_max).index_add_(0, segment_ids, torch.exp(values - shift[segment_ids]))
    return torch.log(sums) + shift


def _is_constant(std: Tensor, mean: Tensor) -> Tensor:
    return std <= _CONSTANT_RTOL * mean.abs().clamp(min=1.0)


def normalize_rewards(
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    mode: RewardNormalization = "global",
    stats: RewardStats | None = None,
) -> tuple[Tensor, RewardStats]:
    r"""Normalise rewards (float64 out) and return the statistics used.

    ``"global"``: ``(r - mu) / sigma`` with the population std; ``stats`` (e.g. the train split's) replaces the
    batch statistics. A constant column is centred only (``scale=1``, ``constant=True``) instead of dividing by 0.
    ``"per_prompt"``: the same z-score inside each group of ``group_ids``; single-row or constant groups are centred
    only, ``constant`` flags that *every* group was constant. ``"none"``: unchanged. ``stats`` only applies to
    ``"global"`` (the other modes have nothing to reuse across splits) and is ignored otherwise.
    """
    _check_choice("reward_normalization", mode, REWARD_NORMALIZATIONS)
    r = rewards.detach().to(torch.float64)
    _check_finite("reward", r, "rewards must be finite numbers.")
    if mode == "none":
        return r.clone(), RewardStats(0.0, 1.0, False)
    if mode == "per_prompt":
        return _normalize_per_prompt(r, group_ids)
    if stats is None:
        stats = _global_stats(r)
    return (r - stats.mean) / stats.scale, stats


def _global_stats(r: Tensor) -> RewardStats:
    if r.numel() == 0:
        return RewardStats(0.0, 1.0, True)
    mean, std = r.mean(), r.std(correction=0)
    constant = bool(_is_constant(std, mean))
    return RewardStats(float(mean), 1.0 if constant else float(std), constant)


def _normalize_per_prompt(r: Tensor, group_ids: Tensor | None) -> tuple[Tensor, RewardStats]:
    if group_ids is None:
        raise ValueError("reward_normalization='per_prompt' needs group_ids (one prompt id per row).")
    if group_ids.shape != r.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(r.shape)}.")
    _, g = torch.unique(group_ids.to(r.device), return_inverse=True)
    num = int(g.max()) + 1 if g.numel() else 0
    counts = torch.zeros(num, dtype=torch.float64, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros_like(counts).index_add_(0, g, r) / counts
    centred = r - mean[g]
    std = (torch.zeros_like(counts).index_add_(0, g, centred**2) / counts).sqrt()
    constant = _is_constant(std, mean)
    scale = torch.where(constant, torch.ones_like(std), std)
    return centred / scale[g], RewardStats(0.0, 1.0, bool(constant.all()))


def _distinct_completions(group: Tensor, completion_ids: Tensor | None) -> tuple[Tensor, int]:
    """Dense id of each row's distinct (group, completion) pair: completion ids only mean something per prompt."""
    if completion_ids is None:
        return torch.arange(group.numel(), device=group.device), group.numel()
    _, c = torch.unique(completion_ids.to(group.device), return_inverse=True)
    key = group * (int(c.max()) + 1 if c.numel() else 1) + c
    _, d = torch.unique(key, return_inverse=True)
    return d, int(d.max()) + 1 if d.numel() else 0


def _segment_mean(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    sums = torch.zeros(num_segments, dtype=torch.float64, device=values.device).index_add_(0, segment_ids, values)
    counts = torch.zeros_like(sums).index_add_(0, segment_ids, torch.ones_like(values))
    return sums / counts


def _empirical(
    ref: Tensor, r: Tensor, g: Tensor, num_groups: int, completion_ids: Tensor | None, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group ``log Z`` over distinct completions, rows' (dedup-mean) rewards and distinct counts per group."""
    d, num_distinct = _distinct_completions(g, completion_ids)
    r_d, ref_d = _segment_mean(r, d, num_distinct), _segment_mean(ref, d, num_distinct)
    group_of_d = torch.zeros(num_distinct, dtype=torch.long, device=g.device).scatter_(0, d, g)
    log_z = segment_logsumexp(ref_d + r_d / tau, group_of_d, num_groups)
    return log_z, r_d[d], torch.bincount(group_of_d, minlength=num_groups)


def _monte_carlo(r: Tensor, g: Tensor, num_groups: int, tau: float, tau_z: float) -> tuple[Tensor, Tensor, Tensor]:
    """``V(x) / tau`` with ``V(x) = tau_Z (logsumexp_j (r_j / tau_Z) - log n_x)``: ``log Z(x)`` when ``tau_Z = tau``,
    the group's mean reward over ``tau`` when ``tau_Z = inf``."""
    counts = torch.bincount(g, minlength=num_groups)
    return _pooled_value(r, g, num_groups, counts, tau_z) / tau, r, counts


def _pooled_value(r: Tensor, g: Tensor, num_groups: int, counts: Tensor, tau_z: float) -> Tensor:
    """Per group, ``tau_Z (logsumexp(r / tau_Z) - log n)``, its ``tau_Z -> inf`` limit being the mean."""
    if math.isinf(tau_z):
        return _segment_mean(r, g, num_groups)
    return tau_z * (segment_logsumexp(r / tau_z, g, num_groups) - counts.to(torch.float64).log())


def credibility(rewards: Tensor, group_ids: Tensor) -> float:
    r"""Buhlmann-Straub ``k`` of the credibility weight ``w_x = n_x / (n_x + k)`` of each group's mean reward.

    ``k = s_w^2 / a`` with ``s_w^2`` the pooled within-group variance (unbiased, groups of 2+ rows) and ``a`` the
    unbiased between-group variance of the group means, floored at 0. ``inf`` (no between-group signal: every
    group gets the pooled value), ``0`` when rewards do not vary inside any group (each group keeps its own),
    ``nan`` when neither variance can be estimated (one group, or single-row groups only).
    """
    r = rewards.detach().to(torch.float64)
    _, g = torch.unique(group_ids.to(r.device), return_inverse=True)
    num_groups = int(g.max()) + 1 if g.numel() else 0
    counts = torch.bincount(g, minlength=num_groups).to(torch.float64)
    means = _segment_mean(r, g, num_groups)
    within_dof = float((counts - 1).clamp(min=0).sum())
    total = float(counts.sum())
    between_dof = total - float((counts**2).sum()) / total if total else 0.0
    if num_groups < 2 or within_dof == 0 or between_dof == 0:
        return math.nan
    within = float(torch.zeros_like(means).index_add_(0, g, (r - means[g]) ** 2).sum()) / within_dof
    grand = float((counts * means).sum()) / total
    between = (float((counts * (means - grand) ** 2).sum()) - (num_groups - 1) * within) / between_dof
    if between <= 0:
        return math.inf
    return within / between


def _no_partition(r: Tensor, g: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """``log Z = 0`` for every group; counts of +inf so that no group is ever sparse."""
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    return zeros, r, torch.full_like(zeros, math.inf)


def _check_beta(beta: float) -> float:
    try:
        tau = float(beta)
    except (TypeError, ValueError):
        tau = math.nan
    if isinstance(beta, bool) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"beta (the temperature tau) must be a finite number > 0, got {beta!r}.")
    return tau


def _validate_inputs(ref_logps: Tensor, rewards: Tensor, group_ids: Tensor, completion_ids: Tensor | None) -> None:
    tensors = {"ref_logps": ref_logps, "rewards": rewards, "group_ids": group_ids, "completion_ids": completion_ids}
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) != 1 or len(shapes["rewards"]) != 1:
        raise ValueError(f"RPO inputs must be 1-D tensors of equal length, got shapes {shapes}.")
    _check_finite(
        "reference log-prob (-inf/NaN)",
        ref_logps,
        "the reference model assigns zero probability to these completions; check the tokenizer / chat template "
        "and that the reference model matches the policy.",
    )
    _check_finite("reward", rewards, "rewards must be finite numbers.")


def aggregate_logps(sum_logps: Tensor, num_tokens: Tensor, aggregation: LogpsAggregation = "sum") -> Tensor:
    """A row's log-prob from its summed token log-probs and token count: the sum, or the mean per token."""
    _check_choice("logps_aggregation", aggregation, LOGPS_AGGREGATIONS)
    return sum_logps if aggregation == "sum" else sum_logps / num_tokens.clamp(min=1)


def rpo_targets(
    ref_logps: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    completion_ids: Tensor | None = None,
    *,
    beta: float = 5.0,
    estimator: Estimator = "empirical",
    min_completions_per_prompt: int = 2,
    sparse_prompt_strategy: SparsePromptStrategy = "global_baseline",
    global_value: float | None = None,
    partition_temperature: float | None = None,
    value_shrinkage: ValueShrinkage = "none",
    credibility_k: float | None = None,
) -> RPOTargets:
    r"""Per-row RPO regression targets ``t_j = (r_j - V(x)) / tau`` (float64, no gradient).

    ``rewards`` must already be normalised. ``completion_ids=None`` makes every row a distinct completion.
    Prompts with fewer than ``min_completions_per_prompt`` distinct completions (``"empirical"``) or rows
    (``"monte_carlo"``) are sparse: ``"global_baseline"`` uses ``V_g`` (``global_value`` if given, e.g. the train
    split's), ``"drop"`` gives them a NaN target and ``keep=False``, ``"error"`` raises. ``"none"`` sets
    ``V = 0`` (targets ``r_j / tau``) and has no sparse prompts.

    With ``"monte_carlo"``, ``partition_temperature`` (``tau_Z``, default ``tau``; ``inf`` allowed) sets the
    temperature of ``V(x)`` and of ``V_g``, and ``value_shrinkage="empirical_bayes"`` shrinks each ``V(x)`` toward
    ``V_g`` with the weight ``n_x / (n_x + k)``, ``k`` from [`credibility`] (``credibility_k`` if given, e.g. the
    train split's; ``k = nan``, no estimate, keeps every ``V(x)``).
    """
    tau = _check_beta(beta)
    _validate_inputs(ref_logps, rewards, group_ids, completion_ids)
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_choice("sparse_prompt_strategy", sparse_prompt_strategy, SPARSE_PROMPT_STRATEGIES)
    _check_choice("value_shrinkage", value_shrinkage, VALUE_SHRINKAGES)
    tau_z = _check_level_options(estimator, tau, partition_temperature, value_shrinkage)
    if isinstance(min_completions_per_prompt, bool) or not isinstance(min_completions_per_prompt, int):
        raise TypeError(f"min_completions_per_prompt must be an int, got {min_completions_per_prompt!r}.")
    if global_value is not None and not math.isfinite(global_value):
        raise ValueError(f"global_value must be finite, got {global_value!r}.")
    ref, r = ref_logps.detach().to(torch.float64), rewards.detach().to(torch.float64)
    _, g = torch.unique(group_ids.to(r.device), return_inverse=True)
    num_groups = int(g.max()) + 1 if g.numel() else 0
    if estimator == "empirical":
        log_z, r_row, counts = _empirical(ref, r, g, num_groups, completion_ids, tau)
    elif estimator == "monte_carlo":
        log_z, r_row, counts = _monte_carlo(r, g, num_groups, tau, tau_z)
    else:
        log_z, r_row, counts = _no_partition(r, g, num_groups)
    if global_value is None:
        global_value = _global_value(r, tau_z)
    k = math.nan
    if value_shrinkage == "empirical_bayes":
        k = credibility(r, g) if credibility_k is None else float(credibility_k)
        log_z = _shrink(log_z, counts, k, global_value / tau)
    sparse = (counts < min_completions_per_prompt)[g]
    if sparse.any() and sparse_prompt_strategy == "error":
        _raise_sparse(sparse, g, min_completions_per_prompt, estimator)
    # t = r/tau - log Z is (r - V)/tau without a round trip through V = tau log Z.
    log_value = torch.where(sparse, torch.full_like(r, global_value / tau), log_z[g])
    targets = r_row / tau - log_value
    keep = ~sparse if sparse_prompt_strategy == "drop" else torch.ones_like(sparse)
    values = tau * log_value
    targets, values = targets.masked_fill(~keep, math.nan), values.masked_fill(~keep, math.nan)
    return RPOTargets(targets, values, sparse, keep, float(global_value), k)


def target_level_split(targets: Tensor, group_ids: Tensor) -> tuple[float, float]:
    r"""Root mean squares of the *contrast* ``t_j - tbar_x`` and of the *level* ``tbar_x`` of per-row targets (NaN
    targets, dropped rows, are left out): how much of what the targets ask is moving a prompt's completions apart,
    and how much is moving them all together."""
    kept = ~torch.isnan(targets)
    t = targets[kept].to(torch.float64)
    if t.numel() == 0:
        return math.nan, math.nan
    _, g = torch.unique(group_ids.to(t.device)[kept], return_inverse=True)
    level = _segment_mean(t, g, int(g.max()) + 1)[g]
    return float(((t - level) ** 2).mean().sqrt()), float((level**2).mean().sqrt())


def _check_level_options(estimator: str, tau: float, partition_temperature, value_shrinkage: str) -> float:
    """The partition temperature ``tau_Z`` to use (``tau`` unless given); refuses options the estimator lacks."""
    if partition_temperature is None and value_shrinkage == "none":
        return tau
    if estimator != "monte_carlo":
        raise ValueError(
            "partition_temperature and value_shrinkage apply to the Monte-Carlo partition "
            f"(estimator='monte_carlo'), got estimator={estimator!r}: the empirical estimate's level includes "
            "log sum pi_ref(y), which has no pooled counterpart, and 'none' has no partition."
        )
    if partition_temperature is None:
        return tau
    tau_z = float(partition_temperature)
    if isinstance(partition_temperature, bool) or math.isnan(tau_z) or tau_z <= 0:
        raise ValueError(f"partition_temperature must be > 0 (inf allowed), got {partition_temperature!r}.")
    return tau_z


def _shrink(log_value: Tensor, counts: Tensor, k: float, global_log_value: float) -> Tensor:
    """``w V(x) + (1 - w) V_g`` per group (in units of ``1 / tau``), ``w = n / (n + k)``; NaN ``k`` keeps ``V(x)``."""
    if math.isnan(k):
        return log_value
    counts = counts.to(torch.float64)
    weights = torch.ones_like(log_value) if k == 0 else counts / (counts + k)
    return weights * log_value + (1 - weights) * global_log_value


def _global_value(r: Tensor, tau: float) -> float:
    """``V_g = tau (logsumexp_i (r_i / tau) - log N)`` over every row: the Monte-Carlo value of one pooled prompt
    (the mean reward when ``tau = inf``)."""
    if r.numel() == 0:
        return math.nan
    if math.isinf(tau):
        return float(r.mean())
    return tau * (float(torch.logsumexp(r / tau, dim=0)) - math.log(r.numel()))


def _raise_sparse(sparse: Tensor, g: Tensor, min_completions: int, estimator: str) -> None:
    unit = "distinct completions" if estimator == "empirical" else "rows"
    num_prompts = int(torch.unique(g[sparse]).numel())
    raise ValueError(
        f"{num_prompts} prompt(s) ({int(sparse.sum())} rows; first rows: {_first_rows(sparse)}) have fewer than "
        f"min_completions_per_prompt={min_completions} {unit}, so their partition function cannot be estimated. "
        "Add completions for these prompts, lower min_completions_per_prompt, or set "
        "sparse_prompt_strategy='global_baseline' or 'drop'."
    )


def rpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    targets: Tensor,
    group_ids: Tensor | None = None,
    *,
    level_weight: float = 1.0,
    huber_delta: float | None = None,
) -> RPOLossOutput:
    r"""Per-example ``0.5 * ((p - l) - t) ** 2`` in the dtype of ``policy_logps``; only ``p`` gets a gradient.

    With ``huber_delta`` ``d`` (``level_weight`` 1 only), the square becomes Huber's loss of the residual
    ``delta = (p - l) - t``: ``0.5 * delta ** 2`` when ``|delta| <= d``, else ``d * (|delta| - d / 2)``. Same minimum,
    same gradient near it; the gradient is ``delta`` clipped to ``[-d, d]``, so a row whose target is out of reach
    pulls no harder than ``d``.

    With ``level_weight`` ``lambda != 1`` (``group_ids`` then required), each row's residual ``delta_j`` is split
    around the mean ``dbar_x`` of its prompt's rows in this batch: the per-example loss is
    ``0.5 * (delta_j - dbar_x) ** 2 + 0.5 * lambda * dbar_x ** 2``, whose gradient is
    ``delta_j - (1 - lambda) dbar_x``; summed over a prompt it is
    ``0.5 * [sum_j (delta_j - dbar_x) ** 2 + lambda n_x dbar_x ** 2]``, and ``lambda = 1`` gives the plain loss.
    A row alone in its prompt within the batch is all level: its loss is ``lambda`` times the plain one, so batch
    whole prompts together (``train_sampling_strategy="group_by_prompt"``).

    Rows with a NaN (dropped) target get a NaN loss, so forgetting the ``keep`` mask is loud, yet their gradient
    is exactly 0 and they do not enter their prompt's mean: ``losses[keep].mean()`` stays finite (a plain
    ``NaN * 0`` in backward would poison it).
    """
    if not (policy_logps.shape == ref_logps.shape == targets.shape):
        raise ValueError(
            f"policy_logps, ref_logps and targets must share a shape, got {tuple(policy_logps.shape)}, "
            f"{tuple(ref_logps.shape)} and {tuple(targets.shape)}."
        )
    level_weight = _check_level_weight(level_weight, group_ids, targets)
    huber_delta = _check_huber_delta(huber_delta, level_weight)
    ref = ref_logps.detach().to(policy_logps)
    tgt = targets.detach().to(policy_logps)
    log_ratios = policy_logps - ref
    dropped = torch.isnan(tgt)
    residuals = log_ratios - torch.where(dropped, log_ratios.detach(), tgt)
    if huber_delta is not None:
        per_row = torch.nn.functional.huber_loss(
            residuals, torch.zeros_like(residuals), reduction="none", delta=huber_delta
        )
    elif level_weight == 1.0:
        per_row = 0.5 * residuals**2
    else:
        level = _group_mean(residuals, group_ids, dropped)
        per_row = 0.5 * (residuals - level) ** 2 + 0.5 * level_weight * level**2
    losses = torch.where(dropped, torch.full_like(tgt, math.nan), per_row)
    return RPOLossOutput(losses, log_ratios.detach(), residuals.detach().masked_fill(dropped, math.nan))


def _check_level_weight(level_weight: float, group_ids: Tensor | None, targets: Tensor) -> float:
    weight = float(level_weight)
    if isinstance(level_weight, bool) or not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"level_weight must be a finite number >= 0, got {level_weight!r}.")
    if weight != 1.0 and (group_ids is None or group_ids.shape != targets.shape):
        raise ValueError("level_weight != 1 needs group_ids: one prompt id per row, shaped like the targets.")
    return weight


def _check_huber_delta(huber_delta: float | None, level_weight: float) -> float | None:
    if huber_delta is None:
        return None
    delta = float(huber_delta)
    if isinstance(huber_delta, bool) or not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"huber_delta must be a finite number > 0 (or None), got {huber_delta!r}.")
    if level_weight != 1.0:
        raise ValueError("huber_delta needs level_weight=1: the Huber loss of a split residual is not defined here.")
    return delta


def _group_mean(values: Tensor, group_ids: Tensor, dropped: Tensor) -> Tensor:
    """Each row's mean of ``values`` over the kept rows of its group (with gradient); 0 for a dropped row."""
    _, g = torch.unique(group_ids.to(values.device), return_inverse=True)
    kept = (~dropped).to(values.dtype)
    num = int(g.max()) + 1 if g.numel() else 0
    sums = values.new_zeros(num).index_add(0, g, values * kept)
    counts = values.new_zeros(num).index_add(0, g, kept).clamp(min=1)
    return (sums / counts)[g]


def dro_loss(
    policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, values: Tensor, *, beta: float
) -> DROLossOutput:
    r"""Per-example DRO loss ``0.5 * (r - V - tau * (p - l)) ** 2`` (Richemond et al., 2024, arXiv:2405.19107).

    ``values`` are the learned ``V_phi(x)`` of each row's prompt; ``policy_logps`` and ``values`` get gradients,
    ``ref_logps`` and ``rewards`` (already normalised) are constants. Averaged over a batch of ``B`` rows, the
    gradients are ``-tau * delta / B`` for ``p`` and ``-delta / B`` for ``V``, ``delta = r - V - tau * (p - l)``.
    The population minimiser is ``pi* = pi_ref exp(r / tau) / Z(x)`` with ``V* = tau log Z(x)``. Computed in the
    wider dtype of ``policy_logps`` and ``values``; the returned log-ratios and residuals ``delta`` are detached.
    """
    tau = _check_beta(beta)
    if not (policy_logps.shape == ref_logps.shape == rewards.shape == values.shape):
        raise ValueError(
            "policy_logps, ref_logps, rewards and values must share a shape, got "
            f"{[tuple(t.shape) for t in (policy_logps, ref_logps, rewards, values)]}."
        )
    dtype = torch.promote_types(policy_logps.dtype, values.dtype)
    policy, v = policy_logps.to(dtype), values.to(dtype)
    ref, r = ref_logps.detach().to(policy), rewards.detach().to(policy)
    log_ratios = policy - ref
    residuals = r - v - tau * log_ratios
    return DROLossOutput(0.5 * residuals**2, log_ratios.detach(), residuals.detach())


def pairwise_ranking_counts(
    implicit_rewards: Tensor, rewards: Tensor, group_ids: Tensor, tie_tolerance: float = RANKING_TIE_TOLERANCE
) -> tuple[Tensor, Tensor]:
    r"""``(correct, total)`` over same-group pairs ``i < j`` whose rewards differ.

    A pair counts 1 when ``sign(s_i - s_j) = sign(r_i - r_j)`` for the implicit rewards ``s``, and ½ when
    ``|s_i - s_j| <= tie_tolerance`` — a tie is no order, as in the AUC, so an untrained policy scores exactly ½
    however float noise tilts its log-ratios. Rewards tie when ``torch.isclose`` says so (``0.1 + 0.2`` and
    ``0.3``); such pairs have no order to get right and are not counted. Returns 0-dim float32 tensors (summable
    across processes before dividing). Memory grows with the pairs inside groups, not with the square of the rows:
    groups of one size are compared together, in chunks.
    """
    s = implicit_rewards.detach()
    r, g = rewards.detach().to(s.device), group_ids.to(s.device)
    correct = torch.zeros((), dtype=torch.float32, device=s.device)
    total = torch.zeros_like(correct)
    if s.numel() == 0:
        return correct, total
    _, dense, counts = torch.unique(g, return_inverse=True, return_counts=True)
    size = counts[dense]
    order = torch.argsort(size * counts.numel() + dense)  # rows by group size, then group: each group contiguous
    s, r, size = s[order], r[order], size[order]
    for k in torch.unique(size).tolist():
        if k < 2:
            continue
        same_size = size == k
        scores, targets = s[same_size].view(-1, k), r[same_size].view(-1, k)
        upper = torch.ones(k, k, dtype=torch.bool, device=s.device).triu(diagonal=1)
        step = max(1, _PAIR_CHUNK // (k * k))
        for start in range(0, scores.size(0), step):
            chunk_s, chunk_r = scores[start : start + step], targets[start : start + step]
            d_s = chunk_s[:, :, None] - chunk_s[:, None, :]
            d_r = chunk_r[:, :, None] - chunk_r[:, None, :]
            valid = upper & ~torch.isclose(chunk_r[:, :, None], chunk_r[:, None, :])
            tie = d_s.abs() <= tie_tolerance
            correct += (valid & ~tie & (torch.sign(d_s) == torch.sign(d_r))).sum() + 0.5 * (valid & tie).sum()
            total += valid.sum()
    return correct, total
