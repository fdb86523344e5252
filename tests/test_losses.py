"""Tests of the pure RPO maths in ``trl_rpo/losses.py``.

The module is loaded by file path (``importlib.util.spec_from_file_location``) so that ``trl_rpo/__init__.py``,
which may import the TRL trainer, never runs: these tests need torch only.
"""

import importlib.util
import math
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch


LOSSES_PATH = Path(__file__).resolve().parents[1] / "trl_rpo" / "losses.py"


def _load_losses():
    spec = importlib.util.spec_from_file_location("_rpo_losses_under_test", LOSSES_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


losses = _load_losses()
F64 = torch.float64
LOG = math.log


def _t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def _targets(ref, r, g, c=None, **kwargs):
    c = None if c is None else torch.tensor(c)
    return losses.rpo_targets(_t(ref), _t(r), torch.tensor(g), c, **kwargs)


def _naive_targets(ref, r, g, c, *, tau, estimator, min_c=2, strategy="global_baseline", global_value=None):
    """Loop-and-dict reference: groups -> distinct completions -> math.log(sum(math.exp(...)))."""
    rows_by_group = defaultdict(list)
    for j, gid in enumerate(g):
        rows_by_group[gid].append(j)
    if global_value is None:
        global_value = tau * (LOG(sum(math.exp(x / tau) for x in r)) - LOG(len(r)))
    out, keep = [math.nan] * len(r), [True] * len(r)
    for rows in rows_by_group.values():
        distinct = defaultdict(list)
        for j in rows:
            distinct[c[j]].append(j)
        if estimator == "empirical":
            mean = {
                k: (sum(ref[j] for j in js) / len(js), sum(r[j] for j in js) / len(js)) for k, js in distinct.items()
            }
            own_r = {j: mean[c[j]][1] for j in rows}
            size, log_z = len(distinct), LOG(sum(math.exp(lr + rr / tau) for lr, rr in mean.values()))
        else:
            own_r = {j: r[j] for j in rows}
            size, log_z = len(rows), LOG(sum(math.exp(r[j] / tau) for j in rows)) - LOG(len(rows))
        if size < min_c:
            if strategy == "error":
                raise ValueError("sparse")
            if strategy == "drop":
                for j in rows:
                    keep[j] = False
                continue
            log_z = global_value / tau
        for j in rows:
            out[j] = own_r[j] / tau - log_z
    return out, keep, global_value


def _random_batch(seed, num_groups=30, with_sparse=True):
    """Groups with arbitrary int64 ids, duplicated completions (sharing their ref log-prob) and sparse groups."""
    rng = random.Random(seed)
    ref, r, g, c = [], [], [], []
    for k in range(num_groups):
        gid = rng.randrange(-(2**40), 2**40)
        size = rng.randint(1, 6) if with_sparse else rng.randint(3, 6)
        pool = 1 if with_sparse and k % 7 == 0 else (size if not with_sparse else 3)  # pool 1: one distinct only
        ref_of = {cid: -rng.uniform(1.0, 30.0) for cid in range(pool)}
        cids = [rng.randrange(pool) for _ in range(size)] if with_sparse else [0, 1, *range(size - 2)]
        for cid in cids:
            ref.append(ref_of[cid])
            r.append(rng.uniform(-2.0, 2.0))
            g.append(gid)
            c.append(cid)
    order = list(range(len(r)))
    rng.shuffle(order)  # groups interleaved, ids unsorted
    return tuple([x[i] for i in order] for x in (ref, r, g, c))


# 1. hand-computed values -------------------------------------------------------------------------------------


HAND = {
    # rows interleaved; group 7: pi_ref = (1/2, 1/4), e^r = (2, 1);
    # group -3: pi_ref = (1/10, 1/10, 1/5), e^r = (1, 3, 2)
    "g": [7, -3, 7, -3, -3],
    "ref": [LOG(0.5), LOG(0.1), LOG(0.25), LOG(0.1), LOG(0.2)],
    "r": [LOG(2), 0.0, 0.0, LOG(3), LOG(2)],
}


def test_hand_computed_empirical():
    """tau = 1. Group 7: Z = 0.5*2 + 0.25*1 = 1.25, t = log(e^r / Z) = (log 1.6, log 0.8).
    Group -3: Z = 0.1*1 + 0.1*3 + 0.2*2 = 0.8, t = (log 1.25, log 3.75, log 2.5); V = tau log Z."""
    out = _targets(HAND["ref"], HAND["r"], HAND["g"], beta=1.0)
    expected = [LOG(1.6), LOG(1.25), LOG(0.8), LOG(3.75), LOG(2.5)]
    torch.testing.assert_close(out.targets, _t(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        out.values, _t([LOG(1.25), LOG(0.8), LOG(1.25), LOG(0.8), LOG(0.8)]), rtol=0, atol=1e-12
    )
    assert out.keep.all()
    assert not out.sparse.any()


def test_hand_computed_monte_carlo():
    """tau = 1. Group 7: Z = (2 + 1)/2 = 1.5, t = (log 4/3, log 2/3). Group -3: Z = (1 + 3 + 2)/3 = 2,
    t = (log 1/2, log 3/2, log 1); the ref log-probs play no part."""
    out = _targets(HAND["ref"], HAND["r"], HAND["g"], beta=1.0, estimator="monte_carlo")
    expected = [LOG(4 / 3), LOG(0.5), LOG(2 / 3), LOG(1.5), 0.0]
    torch.testing.assert_close(out.targets, _t(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.values, _t([LOG(1.5), LOG(2), LOG(1.5), LOG(2), LOG(2)]), rtol=0, atol=1e-12)


def test_no_partition_targets_are_reward_over_tau_and_never_sparse():
    """The ablation V = 0: t = r / tau (tau = 2), whatever the ref log-probs; the lone row of group 5 is not sparse."""
    out = _targets(
        [-9.0, -1.0, -3.0], [1.0, -3.0, 0.5], [0, 0, 5], beta=2.0, estimator="none", sparse_prompt_strategy="error"
    )
    torch.testing.assert_close(out.targets, _t([0.5, -1.5, 0.25]), rtol=0, atol=0)
    torch.testing.assert_close(out.values, _t([0.0, 0.0, 0.0]), rtol=0, atol=0)
    assert not out.sparse.any()
    assert out.keep.all()


def test_hand_computed_loss():
    """policy = ref + t + e with e = (0.1, -0.2, 0, 0.3, -0.1): L = 0.5 * (0.01+0.04+0+0.09+0.01)/5 = 0.015."""
    t = _targets(HAND["ref"], HAND["r"], HAND["g"], beta=1.0).targets
    e = _t([0.1, -0.2, 0.0, 0.3, -0.1])
    out = losses.rpo_loss(_t(HAND["ref"]) + t + e, _t(HAND["ref"]), t)
    assert out.losses.mean().item() == pytest.approx(0.015, abs=1e-12)
    torch.testing.assert_close(out.residuals, e)
    torch.testing.assert_close(out.log_ratios, t + e)


# 2. parity with the naive reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["empirical", "monte_carlo"])
@pytest.mark.parametrize("strategy", ["global_baseline", "drop", "error"])
@pytest.mark.parametrize("tau", [0.2, 1.0, 5.0])
@pytest.mark.parametrize("min_c", [2, 3])
def test_parity_with_naive_reference(estimator, strategy, tau, min_c):
    ref, r, g, c = _random_batch(seed=int(tau * 10) + min_c)
    kwargs = {"beta": tau, "estimator": estimator, "min_completions_per_prompt": min_c}
    if strategy == "error":
        with pytest.raises(ValueError, match="sparse"):
            _naive_targets(ref, r, g, c, tau=tau, estimator=estimator, min_c=min_c, strategy=strategy)
        with pytest.raises(ValueError, match="min_completions_per_prompt"):
            _targets(ref, r, g, c, sparse_prompt_strategy=strategy, **kwargs)
        return
    expected, keep, global_value = _naive_targets(
        ref, r, g, c, tau=tau, estimator=estimator, min_c=min_c, strategy=strategy
    )
    out = _targets(ref, r, g, c, sparse_prompt_strategy=strategy, **kwargs)
    assert not all(keep) or strategy == "global_baseline"  # the batch really has sparse groups
    assert out.keep.tolist() == keep
    torch.testing.assert_close(out.targets, _t(expected), rtol=1e-10, atol=1e-10, equal_nan=True)
    assert out.global_value == pytest.approx(global_value, rel=1e-12)


def test_completion_ids_are_scoped_to_their_group():
    """Completion id 0 of group 1 and id 0 of group 2 are different completions: same as completion_ids=None."""
    ref, r, g = [-1.0, -2.0, -3.0, -4.0], [0.5, -0.5, 1.0, 2.0], [1, 1, 2, 2]
    scoped = _targets(ref, r, g, [0, 1, 0, 1]).targets
    torch.testing.assert_close(scoped, _targets(ref, r, g).targets)


# 3. invariances -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["empirical", "monte_carlo"])
def test_per_prompt_reward_shift_leaves_targets_unchanged(estimator):
    ref, r, g, c = _random_batch(seed=3, with_sparse=False)
    shift = {gid: random.Random(gid).uniform(-50, 50) for gid in set(g)}
    shifted = [x + shift[gid] for x, gid in zip(r, g, strict=True)]
    base = _targets(ref, r, g, c, beta=2.0, estimator=estimator).targets
    torch.testing.assert_close(_targets(ref, shifted, g, c, beta=2.0, estimator=estimator).targets, base)


@pytest.mark.parametrize("estimator", ["empirical", "monte_carlo"])
def test_scaling_rewards_and_tau_together_leaves_targets_unchanged(estimator):
    ref, r, g, c = _random_batch(seed=4)
    base = _targets(ref, r, g, c, beta=0.5, estimator=estimator).targets
    scaled = _targets(ref, [7.0 * x for x in r], g, c, beta=3.5, estimator=estimator).targets
    torch.testing.assert_close(scaled, base)


def test_empirical_optimum_is_a_distribution_over_distinct_completions():
    """l + t = log_softmax over the group's distinct completions of (l + r/tau): exp(l + t) sums to 1."""
    ref, r, g, c = _random_batch(seed=5, with_sparse=False)
    tau = 0.7
    out = _targets(ref, r, g, c, beta=tau)
    log_pi_star = _t(ref) + out.targets
    for gid in set(g):
        first = {}
        for j, (gj, cj) in enumerate(zip(g, c, strict=True)):
            if gj == gid and cj not in first:
                first[cj] = j
        rows = list(first.values())
        mean_r = _t([sum(r[k] for k in range(len(r)) if g[k] == gid and c[k] == c[j]) for j in rows])
        mean_r = mean_r / _t([sum(1 for k in range(len(r)) if g[k] == gid and c[k] == c[j]) for j in rows])
        expected = torch.log_softmax(_t([ref[j] for j in rows]) + mean_r / tau, dim=0)
        torch.testing.assert_close(log_pi_star[rows], expected)
        assert torch.exp(log_pi_star[rows]).sum().item() == pytest.approx(1.0, abs=1e-12)


def test_monte_carlo_targets_ignore_reference_logps():
    ref, r, g, c = _random_batch(seed=6)
    other_ref = [x - 100.0 * (j % 3) for j, x in enumerate(ref)]
    a = _targets(ref, r, g, c, estimator="monte_carlo").targets
    torch.testing.assert_close(_targets(other_ref, r, g, c, estimator="monte_carlo").targets, a)


# 4. duplicates ----------------------------------------------------------------------------------------------


def test_empirical_duplicate_equals_deduplicated_mean():
    """Rows 0, 1 are one completion (rewards 1 and 3, ref -2.0/-2.2 from kernel noise) == one row (2, -2.1)."""
    dup = _targets(
        [-2.0, -2.2, -1.0, -4.0, -3.0], [1.0, 3.0, 0.5, 0.0, 1.0], [0, 0, 0, 9, 9], [5, 5, 6, 0, 1], beta=1.5
    )
    dedup = _targets([-2.1, -1.0, -4.0, -3.0], [2.0, 0.5, 0.0, 1.0], [0, 0, 9, 9], [5, 6, 0, 1], beta=1.5)
    assert dup.targets[0] == dup.targets[1]
    assert dup.keep.all()
    torch.testing.assert_close(dup.targets[1:], dedup.targets, rtol=0, atol=1e-12)


def test_monte_carlo_counts_duplicates_as_samples():
    dup = _targets([-2.0, -2.0, -1.0], [1.0, 3.0, 0.5], [0, 0, 0], [5, 5, 6], estimator="monte_carlo", beta=1.0)
    dedup = _targets([-2.0, -1.0], [2.0, 0.5], [0, 0], [5, 6], estimator="monte_carlo", beta=1.0)
    # Z = (e^1 + e^3 + e^0.5)/3, each row keeps its own reward
    log_z = LOG((math.exp(1) + math.exp(3) + math.exp(0.5)) / 3)
    torch.testing.assert_close(dup.targets, _t([1 - log_z, 3 - log_z, 0.5 - log_z]), rtol=0, atol=1e-12)
    assert not torch.isclose(dup.targets[2], dedup.targets[1])


# 5. sparse prompts ----------------------------------------------------------------------------------------------

SPARSE = {"ref": [-1.0, -2.0, -7.5], "r": [0.0, LOG(3), LOG(2)], "g": [4, 4, 8]}  # group 8: one row


def test_single_completion_without_handling_targets_minus_ref_logp():
    """With one completion Z = pi_ref(y) e^{r/tau}, so t = r/tau - log Z = -l: the policy would be pushed to
    pi_theta(y|x) = 1 whatever the reward. That is why such prompts are 'sparse'."""
    out = _targets(SPARSE["ref"], SPARSE["r"], SPARSE["g"], beta=1.0, min_completions_per_prompt=1)
    assert out.targets[2].item() == pytest.approx(7.5, abs=1e-12)


def test_sparse_global_baseline_by_hand():
    """tau = 1: V_g = log((e^0 + e^log3 + e^log2)/3) = log 2, so row 2 gets t = (log 2 - log 2)/1 = 0."""
    out = _targets(SPARSE["ref"], SPARSE["r"], SPARSE["g"], beta=1.0)
    assert out.global_value == pytest.approx(LOG(2), abs=1e-12)
    assert out.sparse.tolist() == [False, False, True]
    assert out.keep.all()
    assert out.targets[2].item() == pytest.approx(0.0, abs=1e-12)
    assert out.values[2].item() == pytest.approx(LOG(2), abs=1e-12)
    # group 4 still normalises itself: Z = e^-1 + e^-2 * 3
    assert out.targets[0].item() == pytest.approx(-LOG(math.exp(-1) + 3 * math.exp(-2)), abs=1e-12)


def test_sparse_global_value_passed_in_is_used():
    out = _targets(SPARSE["ref"], SPARSE["r"], SPARSE["g"], beta=2.0, global_value=-3.0)
    assert out.global_value == -3.0
    assert out.targets[2].item() == pytest.approx((LOG(2) + 3.0) / 2.0, abs=1e-12)


def test_sparse_drop():
    kept = _targets(SPARSE["ref"], SPARSE["r"], SPARSE["g"], beta=1.0)
    out = _targets(SPARSE["ref"], SPARSE["r"], SPARSE["g"], beta=1.0, sparse_prompt_strategy="drop")
    assert out.keep.tolist() == [True, True, False]
    assert math.isnan(out.targets[2])
    assert math.isnan(out.values[2])
    torch.testing.assert_close(out.targets[:2], kept.targets[:2])


def test_sparse_error_names_rows_and_fixes():
    g = [1, 1, 2, 2, 3, 4, 4]  # group 3 (row 4) has one row
    with pytest.raises(ValueError, match="min_completions_per_prompt") as info:
        _targets([-1.0] * 7, [0.1 * j for j in range(7)], g, sparse_prompt_strategy="error")
    msg = str(info.value)
    for needle in ("1 prompt(s)", "[4]", "Add completions", "'drop'", "global_baseline"):
        assert needle in msg


def test_empirical_sparse_counts_distinct_completions_not_rows():
    """Two rows of the same completion: one distinct completion (sparse) for empirical, two samples for MC."""
    args = ([-1.0, -1.0, -2.0, -3.0], [0.0, 1.0, 0.2, 0.3], [1, 1, 2, 2], [0, 0, 0, 1])
    assert _targets(*args).sparse.tolist() == [True, True, False, False]
    assert not _targets(*args, estimator="monte_carlo").sparse.any()


# 6. reward normalisation ----------------------------------------------------------------------------------------


def test_normalize_global_population_std_and_reuse():
    train = _t([1.0, 2.0, 3.0, 6.0])  # mean 3, population var (4 + 1 + 0 + 9)/4 = 3.5
    z, stats = losses.normalize_rewards(train)
    assert stats == (3.0, pytest.approx(math.sqrt(3.5)), False)
    torch.testing.assert_close(z, (train - 3.0) / math.sqrt(3.5))
    z_eval, stats_eval = losses.normalize_rewards(_t([3.0, 10.0]), stats=stats)
    assert stats_eval == stats
    torch.testing.assert_close(z_eval, _t([0.0, 7.0 / math.sqrt(3.5)]))


@pytest.mark.parametrize("value", [0.0, 4.2, -1e9])
def test_normalize_constant_column_is_centred_not_scaled(value):
    # rounding-level jitter (relative 1e-15) must not be blown up to unit variance
    z, stats = losses.normalize_rewards(value * (1.0 + 1e-15 * _t([0.0, 1.0, 0.0, 1.0, 1.0])))
    assert stats.constant
    assert stats.scale == 1.0
    assert torch.isfinite(z).all()
    assert z.abs().max() < 1e-3


def test_normalize_per_prompt_and_none():
    r, g = _t([1.0, 3.0, 10.0, 7.0, 7.0 + 1e-14, 5.0]), torch.tensor([2, 2, 9, 4, 4, 2])
    z, stats = losses.normalize_rewards(r, g, mode="per_prompt")
    # group 2: (1, 3, 5) mean 3, pop std sqrt(8/3); group 9: single row -> centred;
    # group 4: constant up to rounding -> centred
    s = math.sqrt(8 / 3)
    torch.testing.assert_close(z, _t([-2 / s, 0.0, 0.0, 0.0, 0.0, 2 / s]))
    assert not stats.constant
    same, _ = losses.normalize_rewards(r, mode="none")
    torch.testing.assert_close(same, r)
    with pytest.raises(ValueError, match="group_ids"):
        losses.normalize_rewards(r, mode="per_prompt")
    with pytest.raises(ValueError, match=r"\[1\]"):
        losses.normalize_rewards(_t([0.0, math.nan]))


# 7. gradients -----------------------------------------------------------------------------------------------------


def test_gradcheck_and_gradient_formula():
    torch.manual_seed(0)
    ref, tgt = torch.randn(6, dtype=F64) - 5, torch.randn(6, dtype=F64)
    policy = torch.randn(6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: losses.rpo_loss(p, ref, tgt).losses, (policy,))
    out = losses.rpo_loss(policy, ref, tgt)
    out.losses.mean().backward()
    torch.testing.assert_close(policy.grad, (out.log_ratios - tgt) / 6)
    torch.testing.assert_close(out.residuals, policy.detach() - ref - tgt)


def test_no_gradient_to_reference_or_targets_and_policy_dtype():
    policy = torch.randn(4, requires_grad=True)
    ref = torch.randn(4, dtype=F64, requires_grad=True)
    tgt = torch.randn(4, dtype=F64, requires_grad=True)
    out = losses.rpo_loss(policy, ref, tgt)
    assert out.losses.dtype == torch.float32
    out.losses.sum().backward()
    assert ref.grad is None
    assert tgt.grad is None
    assert policy.grad is not None


def test_dropped_rows_have_nan_loss_but_zero_gradient():
    policy = torch.zeros(3, dtype=F64, requires_grad=True)
    out = losses.rpo_loss(policy, torch.zeros(3, dtype=F64), _t([1.0, math.nan, -1.0]))
    assert math.isnan(out.losses[1].item())
    out.losses[torch.tensor([True, False, True])].mean().backward()
    torch.testing.assert_close(policy.grad, _t([-0.5, 0.0, 0.5]))


# 8. extremes ------------------------------------------------------------------------------------------------------


def _naive_shifted_lse(xs):
    m = max(xs)
    return m + LOG(sum(math.exp(x - m) for x in xs))


@pytest.mark.parametrize("estimator", ["empirical", "monte_carlo"])
def test_extreme_rewards_tiny_tau_large_negative_logps(estimator):
    tau, g = 1e-3, [0, 0, 0, 1, 1]
    r, ref = [1e6, -1e6, 1e6 - 1e-3, -1e6, 5e5], [-5000.0, -5001.0, -4999.0, -5000.0, -5000.0]
    out = _targets(ref, r, g, beta=tau, estimator=estimator)
    assert torch.isfinite(out.targets).all()
    assert torch.isfinite(out.values).all()
    for rows in ([0, 1, 2], [3, 4]):
        terms = [r[j] / tau + (ref[j] if estimator == "empirical" else 0.0) for j in rows]
        log_z = _naive_shifted_lse(terms) - (LOG(len(rows)) if estimator == "monte_carlo" else 0.0)
        torch.testing.assert_close(out.targets[rows], _t([r[j] / tau - log_z for j in rows]), rtol=1e-12, atol=1e-6)


def test_sum_aggregated_logps_underflowing_exp_stay_exact():
    """l ~ -1e4: exp(l) == 0 in float64, yet the empirical optimum is still a distribution per group."""
    ref, r, g = [-1.0e4, -1.02e4, -9.9e3, -1.1e4, -1.05e4], [0.3, -0.2, 1.0, 0.0, 0.5], [0, 0, 0, 1, 1]
    assert math.exp(ref[0]) == 0.0
    out = _targets(ref, r, g, beta=0.5)
    lse = losses.segment_logsumexp(_t(ref) + out.targets, torch.tensor(g), 2)
    torch.testing.assert_close(lse, _t([0.0, 0.0]), rtol=0, atol=1e-9)
    values = _t(ref) + _t(r) / 0.5
    expected = [_naive_shifted_lse([values[j].item() for j in range(5) if g[j] == s]) for s in (0, 1)]
    torch.testing.assert_close(losses.segment_logsumexp(values, torch.tensor(g), 2), _t(expected))


def test_segment_logsumexp_empty_and_all_minus_inf_segments():
    out = losses.segment_logsumexp(_t([1.0, -math.inf, 2.0]), torch.tensor([0, 2, 0]), 3)
    assert out.dtype == F64
    assert out[0].item() == pytest.approx(_naive_shifted_lse([1.0, 2.0]))
    assert out[1].item() == -math.inf
    assert out[2].item() == -math.inf


# 9. errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -1.0, math.inf, math.nan])
def test_invalid_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        _targets([-1.0, -2.0], [0.0, 1.0], [0, 0], beta=beta)


def test_invalid_inputs_name_rows():
    with pytest.raises(ValueError, match=r"reward.*\[2\]"):
        _targets([-1.0, -2.0, -3.0], [0.0, 1.0, math.nan], [0, 0, 1])
    with pytest.raises(ValueError, match=r"(?s)\[1\].*zero probability.*tokenizer"):
        _targets([-1.0, -math.inf, -3.0], [0.0, 1.0, 2.0], [0, 0, 1])
    with pytest.raises(ValueError, match="monte_carlo"):
        _targets([-1.0], [0.0], [0], estimator="exact")
    with pytest.raises(ValueError, match="drop"):
        _targets([-1.0], [0.0], [0], sparse_prompt_strategy="ignore")
    with pytest.raises(ValueError, match="shape"):
        _targets([-1.0, -2.0], [0.0], [0, 0])


# 10. pairwise ranking accuracy -------------------------------------------------------------------------------------


def test_pairwise_ranking_counts():
    g = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    r = _t([1.0, 2.0, 2.0, 5.0, 3.0, 7.0, 0.0, 1.0])
    s = _t([0.1, 0.5, 0.3, -1.0, 2.0, 9.0, 0.7, 0.7])
    # group 0: (0,1) ok, (0,2) ok, (1,2) reward tie -> excluded; group 1: (3,4) reversed -> wrong;
    # group 2: single row; group 3: implicit-reward tie -> half. Cross-group pairs such as (0,5) never count.
    correct, total = losses.pairwise_ranking_counts(s, r, g)
    assert (correct.item(), total.item()) == (2.5, 4.0)
    assert correct.dim() == 0
    assert correct.is_floating_point()


def test_pairwise_ranking_counts_match_a_double_loop_in_chunks(monkeypatch):
    """Groups of many sizes, shuffled rows, integer rewards (ties) and chunks of a few pairs: the same counts as
    comparing every pair of rows."""
    monkeypatch.setattr(losses, "_PAIR_CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    g = torch.repeat_interleave(torch.arange(9), torch.tensor([1, 2, 2, 3, 5, 5, 8, 1, 13]))
    g = g[torch.randperm(g.numel(), generator=gen)]
    r = torch.randint(0, 4, (g.numel(),), generator=gen).double()
    s = torch.randint(0, 3, (g.numel(),), generator=gen).double()
    correct = total = 0
    for i in range(g.numel()):
        for j in range(i + 1, g.numel()):
            if g[i] == g[j] and r[i] != r[j]:
                total += 1
                correct += 0.5 if s[i] == s[j] else int(torch.sign(s[i] - s[j]) == torch.sign(r[i] - r[j]))
    assert total > 20
    assert tuple(c.item() for c in losses.pairwise_ranking_counts(s, r, g)) == (correct, total)


def test_pairwise_ranking_ties_are_stated_not_left_to_float_noise():
    """An untrained policy (log-ratios 0, or ±1e-7 from another summation order) scores exactly ½: a tie counts
    half. Float-noise reward ties (0.1 + 0.2 against 0.3) are no order and are not counted; a real order is."""
    g = torch.zeros(4, dtype=torch.long)
    r = torch.tensor([0.1 + 0.2, 0.3, 1.0, 2.0], dtype=torch.float64)
    pairs = 5  # 6 pairs, less the float-noise reward tie (0, 1)
    for s in (torch.zeros(4), torch.tensor([1e-7, -1e-7, 5e-8, -3e-8])):
        assert [c.item() for c in losses.pairwise_ranking_counts(s, r, g)] == [pairs / 2, pairs]
    s = torch.tensor([0.0, 0.0, 2e-4, 4e-4])  # beyond the tolerance: ordered like the rewards
    assert [c.item() for c in losses.pairwise_ranking_counts(s, r, g)] == [pairs, pairs]
    correct, _ = losses.pairwise_ranking_counts(-s, r, g)
    assert correct.item() == 0.0  # and reversed: all wrong, so a wrong sign cannot hide behind the ties


# 11. light import --------------------------------------------------------------------------------------------------


def test_module_imports_no_trl_transformers_accelerate():
    """Loads the file by path in a fresh interpreter (package ``__init__`` not run, it may import the trainer)."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(LOSSES_PATH)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in ('trl', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# 12. vectorised scale ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["empirical", "monte_carlo"])
def test_large_batch_matches_naive_on_a_subset(estimator):
    gen = torch.Generator().manual_seed(0)
    n, num_groups = 200_000, 20_000
    dense = torch.randint(0, num_groups, (n,), generator=gen)
    group_ids = dense * 1_000_003 - 7_777_777  # arbitrary, negative and sparse ids
    completion_ids = torch.randint(0, 8, (n,), generator=gen)
    ref = -(((dense * 8 + completion_ids) * 7919) % 997).to(F64) / 10.0 - 1.0  # shared by duplicates
    rewards = torch.randn(n, generator=gen, dtype=F64)
    out = losses.rpo_targets(ref, rewards, group_ids, completion_ids, beta=0.8, estimator=estimator)
    assert out.targets.shape == (n,)
    assert torch.isfinite(out.targets).all()
    expected_gv = 0.8 * (torch.logsumexp(rewards / 0.8, 0).item() - LOG(n))
    assert out.global_value == pytest.approx(expected_gv, rel=1e-12)
    subset = torch.isin(dense, torch.arange(0, num_groups, 97))
    rows = subset.nonzero().flatten()
    naive, _, _ = _naive_targets(
        ref[rows].tolist(),
        rewards[rows].tolist(),
        group_ids[rows].tolist(),
        completion_ids[rows].tolist(),
        tau=0.8,
        estimator=estimator,
        global_value=out.global_value,
    )
    torch.testing.assert_close(out.targets[rows], _t(naive), rtol=1e-10, atol=1e-10)
