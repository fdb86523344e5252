"""The options that set the level of RPO's targets (`trl_rpo/losses.py`): the partition temperature τ_Z, empirical-
Bayes shrinkage of V̂(x) and the level-weighted loss; hand-computed values, parity with naive loops, the limits each
reduces to, and their gradients. Loaded by file path like tests/test_losses.py: torch only."""

import math
import random
import statistics
from collections import defaultdict

import pytest
import torch

from tests.test_losses import _load_losses


losses = _load_losses()
F64 = torch.float64
LOG = math.log


def _t(values):
    return torch.tensor(values, dtype=F64)


def _mc(r, g, **kwargs):
    return losses.rpo_targets(
        torch.zeros(len(r), dtype=F64), _t(r), torch.tensor(g), estimator="monte_carlo", **kwargs
    )


def _groups(g):
    rows = defaultdict(list)
    for j, gid in enumerate(g):
        rows[gid].append(j)
    return rows


def _random_groups(seed, num_groups=12):
    rng = random.Random(seed)
    r, g = [], []
    for k in range(num_groups):
        level = rng.gauss(0, 1)  # prompts differ in mean reward: the between-prompt variance is real
        for _ in range(rng.randint(2, 7)):
            r.append(level + rng.gauss(0, 0.7))
            g.append(1000 + 7 * k)
    order = list(range(len(r)))
    rng.shuffle(order)
    return [r[i] for i in order], [g[i] for i in order]


# the partition temperature --------------------------------------------------------------------------------------


def test_partition_temperature_by_hand():
    """tau = 0.5, tau_Z = 1, rewards (log 2, log 4 | 0, log 3): V = log((2 + 4)/2) = log 3 and log((1 + 3)/2) = log 2;
    t = (r - V) / tau = 2 (log 2 - log 3), 2 (log 4 - log 3), -2 log 2, 2 (log 3 - log 2)."""
    out = _mc([LOG(2), LOG(4), 0.0, LOG(3)], [0, 0, 1, 1], beta=0.5, partition_temperature=1.0)
    expected = [2 * LOG(2 / 3), 2 * LOG(4 / 3), -2 * LOG(2), 2 * LOG(3 / 2)]
    torch.testing.assert_close(out.targets, _t(expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.values, _t([LOG(3), LOG(3), LOG(2), LOG(2)]), rtol=0, atol=1e-12)
    # V_g pools every row at tau_Z: log((2 + 4 + 1 + 3) / 4)
    assert out.global_value == pytest.approx(LOG(2.5), abs=1e-12)


def test_partition_temperature_equal_to_tau_is_the_plain_target_and_inf_the_mean():
    r, g = _random_groups(0)
    for tau in (0.1, 1.0):
        plain = _mc(r, g, beta=tau)
        torch.testing.assert_close(_mc(r, g, beta=tau, partition_temperature=tau).targets, plain.targets)
        mean = _mc(r, g, beta=tau, partition_temperature=math.inf)
        means = {gid: statistics.fmean(r[j] for j in rows) for gid, rows in _groups(g).items()}
        torch.testing.assert_close(mean.targets, _t([(x - means[gid]) / tau for x, gid in zip(r, g, strict=True)]))
        assert mean.global_value == pytest.approx(statistics.fmean(r), abs=1e-12)
        # a very large tau_Z converges to the mean (the limit is continuous)
        near = _mc(r, g, beta=tau, partition_temperature=1e6)
        torch.testing.assert_close(near.targets, mean.targets, rtol=0, atol=1e-5 / tau)


def test_partition_temperature_sets_the_level_not_the_contrast():
    """Any tau_Z shifts all targets of a prompt by one constant: the contrast (r_j - rbar_x)/tau is unchanged."""
    r, g = _random_groups(1)
    tau = 0.25
    for tau_z in (0.05, 0.25, 2.0, math.inf):
        t = _mc(r, g, beta=tau, partition_temperature=tau_z).targets
        for rows in _groups(g).values():
            centred = t[rows] - t[rows].mean()
            contrast = _t([r[j] for j in rows]) / tau
            torch.testing.assert_close(centred, contrast - contrast.mean(), rtol=0, atol=1e-10)
    # a larger tau_Z lowers V (softmax -> mean), so it raises every target: failures are pushed down less
    low = _mc(r, g, beta=tau, partition_temperature=0.25).targets
    high = _mc(r, g, beta=tau, partition_temperature=math.inf).targets
    assert (high >= low - 1e-12).all()
    assert (high > low).any()


def test_partition_temperature_naive_parity():
    r, g = _random_groups(2)
    tau, tau_z = 0.3, 0.7
    out = _mc(r, g, beta=tau, partition_temperature=tau_z)
    expected = [0.0] * len(r)
    for rows in _groups(g).values():
        value = tau_z * (LOG(sum(math.exp(r[j] / tau_z) for j in rows)) - LOG(len(rows)))
        for j in rows:
            expected[j] = (r[j] - value) / tau
    torch.testing.assert_close(out.targets, _t(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["empirical", "none"])
def test_level_options_refused_outside_monte_carlo(estimator):
    kwargs = {"beta": 1.0, "estimator": estimator}
    for option in ({"partition_temperature": 2.0}, {"value_shrinkage": "empirical_bayes"}):
        with pytest.raises(ValueError, match="monte_carlo"):
            losses.rpo_targets(torch.zeros(2), _t([0.0, 1.0]), torch.tensor([0, 0]), **kwargs, **option)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, True])
def test_partition_temperature_must_be_positive(bad):
    with pytest.raises(ValueError, match="partition_temperature"):
        _mc([0.0, 1.0], [0, 0], beta=1.0, partition_temperature=bad)


def test_extreme_partition_temperatures_stay_finite():
    r = [0.0, 1e4, -1e4, 5.0]
    for tau_z in (1e-6, 1e6):
        assert torch.isfinite(_mc(r, [0, 0, 1, 1], beta=0.01, partition_temperature=tau_z).targets).all()


# empirical-Bayes shrinkage ---------------------------------------------------------------------------------------


def test_credibility_by_hand():
    """Two groups of 2: (0, 2) and (4, 6). Within variance s_w^2 = (2 + 2) / 2 = 2; group means 1 and 5, grand mean 3;
    between: (2*4 + 2*4 - 1*2) / (4 - 8/4) = 14 / 2 = 7; k = 2/7."""
    k = losses.credibility(_t([0.0, 2.0, 4.0, 6.0]), torch.tensor([0, 0, 1, 1]))
    assert k == pytest.approx(2 / 7, rel=1e-12)


def test_credibility_limits():
    groups = torch.tensor([0, 0, 1, 1])
    assert losses.credibility(_t([0.0, 1.0, 0.0, 1.0]), groups) == math.inf  # no between-prompt signal
    assert losses.credibility(_t([1.0, 1.0, 3.0, 3.0]), groups) == 0.0  # no within-prompt noise
    assert math.isnan(losses.credibility(_t([1.0, 2.0]), torch.tensor([0, 0])))  # one group
    assert math.isnan(losses.credibility(_t([1.0, 2.0]), torch.tensor([0, 1])))  # single-row groups


def _naive_buhlmann(r, g):
    rows = _groups(g)
    n = {gid: len(js) for gid, js in rows.items()}
    means = {gid: statistics.fmean(r[j] for j in js) for gid, js in rows.items()}
    within = sum((r[j] - means[gid]) ** 2 for gid, js in rows.items() for j in js) / sum(v - 1 for v in n.values())
    total = sum(n.values())
    grand = sum(n[gid] * means[gid] for gid in rows) / total
    between = (sum(n[gid] * (means[gid] - grand) ** 2 for gid in rows) - (len(rows) - 1) * within) / (
        total - sum(v * v for v in n.values()) / total
    )
    return within / between


def test_shrinkage_naive_parity():
    """V_x <- w V_x + (1 - w) V_g, w = n/(n + k): a loop over groups with the textbook Buhlmann-Straub k."""
    r, g = _random_groups(3)
    tau, tau_z = 0.5, math.inf
    k = _naive_buhlmann(r, g)
    assert 0 < k < math.inf
    out = _mc(r, g, beta=tau, partition_temperature=tau_z, value_shrinkage="empirical_bayes")
    assert out.credibility_k == pytest.approx(k, rel=1e-10)
    pooled = statistics.fmean(r)
    expected = [0.0] * len(r)
    for rows in _groups(g).values():
        w = len(rows) / (len(rows) + k)
        value = w * statistics.fmean(r[j] for j in rows) + (1 - w) * pooled
        for j in rows:
            expected[j] = (r[j] - value) / tau
    torch.testing.assert_close(out.targets, _t(expected), rtol=1e-10, atol=1e-10)


def test_shrinkage_gives_a_prompt_without_success_a_signal():
    """A binary reward, tau_Z = inf: without shrinkage a prompt whose 6 samples all fail has targets 0 (nothing to
    learn); shrunk toward the pooled mean, its failures are pushed down, and by less than the pooled baseline would."""
    r = [1, 0, 0, 0, 0, 0] + [0] * 6 + [1, 1, 1, 0, 0, 0] + [1, 1, 0, 0, 0, 0]
    g = [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6
    kwargs = {"beta": 0.1, "partition_temperature": math.inf}
    plain = _mc(r, g, **kwargs).targets
    shrunk = _mc(r, g, value_shrinkage="empirical_bayes", **kwargs)
    assert (plain[6:12] == 0).all()
    pooled = (0 - statistics.fmean(r)) / 0.1
    assert (shrunk.targets[6:12] < 0).all()
    assert (shrunk.targets[6:12] > pooled).all()


def test_shrinkage_limits_and_eval_reuse():
    r, g = _random_groups(4)
    kwargs = {"beta": 0.2, "partition_temperature": 1.0, "value_shrinkage": "empirical_bayes"}
    own = _mc(r, g, beta=0.2, partition_temperature=1.0)
    torch.testing.assert_close(_mc(r, g, credibility_k=0.0, **kwargs).targets, own.targets)  # k = 0: no shrinkage
    pooled = _mc(r, g, credibility_k=math.inf, **kwargs)  # k = inf: every prompt gets V_g
    torch.testing.assert_close(pooled.targets, (_t(r) - own.global_value) / 0.2)
    # an eval split reuses the training k and V_g: its targets do not depend on its own variance estimate
    train = _mc(r, g, **kwargs)
    evaluated = _mc(r[:9], g[:9], credibility_k=train.credibility_k, global_value=train.global_value, **kwargs)
    assert evaluated.credibility_k == train.credibility_k


# the level-weighted loss -----------------------------------------------------------------------------------------


def test_level_weighted_loss_by_hand():
    """Residuals (0.4, -0.2, 0.1 | 0.6): the first prompt's mean is 0.1, its spread 0.09 + 0.09 + 0 = 0.18;
    lambda = 0.5: sum = 0.5 * (0.18 + 0.5 * 3 * 0.01) + 0.5 * (0 + 0.5 * 0.36) = 0.0975 + 0.09 over the 4 rows."""
    targets = _t([1.0, -1.0, 0.0, 2.0])
    residuals = _t([0.4, -0.2, 0.1, 0.6])
    out = losses.rpo_loss(targets + residuals, torch.zeros(4, dtype=F64), targets, torch.tensor([5, 5, 5, 9]),
                          level_weight=0.5)  # fmt: skip
    assert out.losses.sum().item() == pytest.approx(0.0975 + 0.09, abs=1e-12)
    torch.testing.assert_close(out.residuals, residuals)


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 1.0, 3.0])
def test_level_weighted_loss_naive_parity_and_gradient(weight):
    """Per prompt 0.5 [sum (d - dbar)^2 + lambda n dbar^2]; the summed loss's gradient is d - (1 - lambda) dbar."""
    gen = torch.Generator().manual_seed(int(weight * 10))
    g = torch.tensor([3, 1, 3, 3, 8, 1, 8, 8, 8, 2])
    policy = torch.randn(10, dtype=F64, generator=gen).requires_grad_()
    ref, targets = torch.randn(10, dtype=F64, generator=gen), torch.randn(10, dtype=F64, generator=gen)
    out = losses.rpo_loss(policy, ref, targets, g, level_weight=weight)
    out.losses.sum().backward()
    delta = (policy - ref - targets).detach()
    expected, grad = 0.0, torch.zeros(10, dtype=F64)
    for gid in set(g.tolist()):
        rows = (g == gid).nonzero().flatten()
        mean = delta[rows].mean()
        expected += 0.5 * (((delta[rows] - mean) ** 2).sum() + weight * len(rows) * mean**2).item()
        grad[rows] = delta[rows] - (1 - weight) * mean
    assert out.losses.sum().item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(policy.grad, grad)
    if weight == 1.0:  # the plain loss, row by row
        torch.testing.assert_close(out.losses, 0.5 * delta**2)


def test_level_weight_keeps_the_minimum_at_the_targets():
    """For lambda > 0 the loss is 0 only where every residual is 0; lambda = 0 leaves each prompt's level free."""
    g, targets = torch.tensor([0, 0, 1, 1]), _t([1.0, -1.0, 0.5, 2.0])
    shifted = targets + _t([0.3, 0.3, -0.7, -0.7])  # every prompt's rows moved together: only the level is off
    zero = torch.zeros(4, dtype=F64)
    assert losses.rpo_loss(shifted, zero, targets, g, level_weight=0.0).losses.sum().item() == pytest.approx(0.0)
    assert losses.rpo_loss(shifted, zero, targets, g, level_weight=0.1).losses.sum().item() > 0.01
    assert losses.rpo_loss(targets, zero, targets, g, level_weight=0.1).losses.sum().item() == 0.0


def test_level_weighted_loss_skips_dropped_rows():
    """A dropped (NaN-target) row neither counts in its prompt's mean nor gets a gradient."""
    g = torch.tensor([0, 0, 0])
    policy = _t([0.5, -0.5, 9.0]).requires_grad_()
    targets = _t([0.0, 0.0, math.nan])
    out = losses.rpo_loss(policy, torch.zeros(3, dtype=F64), targets, g, level_weight=0.0)
    assert math.isnan(out.losses[2].item())
    out.losses[:2].sum().backward()
    torch.testing.assert_close(policy.grad, _t([0.5, -0.5, 0.0]))  # mean of the kept rows is 0


def test_level_weight_needs_group_ids_and_a_valid_value():
    args = (torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="group_ids"):
        losses.rpo_loss(*args, level_weight=0.5)
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="level_weight"):
            losses.rpo_loss(*args, torch.tensor([0, 0]), level_weight=bad)


# the Huber residual loss ------------------------------------------------------------------------------------------


def test_huber_loss_by_hand():
    """delta = 1: residuals 3, 0.5, -2 give 1 * (3 - 0.5) = 2.5, 0.5 * 0.25 = 0.125, 1 * (2 - 0.5) = 1.5, and
    gradients clipped to 1, 0.5, -1; a dropped row keeps a NaN loss and no gradient."""
    policy = _t([3.0, 0.5, -2.0, 7.0]).requires_grad_()
    targets = _t([0.0, 0.0, 0.0, math.nan])
    out = losses.rpo_loss(policy, torch.zeros(4, dtype=F64), targets, huber_delta=1.0)
    torch.testing.assert_close(out.losses[:3], _t([2.5, 0.125, 1.5]))
    assert math.isnan(out.losses[3])
    out.losses[:3].sum().backward()
    torch.testing.assert_close(policy.grad, _t([1.0, 0.5, -1.0, 0.0]))


@pytest.mark.parametrize("delta", [0.1, 1.0, 4.0])
def test_huber_loss_naive_parity(delta):
    gen = torch.Generator().manual_seed(int(delta * 10))
    ref, targets = torch.randn(20, dtype=F64, generator=gen), torch.randn(20, dtype=F64, generator=gen)
    policy = (ref + targets + 2 * delta * torch.randn(20, dtype=F64, generator=gen)).requires_grad_()  # δ ~ ±2·delta
    out = losses.rpo_loss(policy, ref, targets, huber_delta=delta)
    out.losses.sum().backward()
    residuals = (policy - ref - targets).detach().tolist()
    expected = [0.5 * d * d if abs(d) <= delta else delta * (abs(d) - delta / 2) for d in residuals]
    torch.testing.assert_close(out.losses.detach(), _t(expected))
    torch.testing.assert_close(policy.grad, _t([max(-delta, min(delta, d)) for d in residuals]))
    assert any(abs(d) > delta for d in residuals)  # both branches ran
    assert any(abs(d) <= delta for d in residuals)


def test_huber_loss_with_a_wide_threshold_is_the_plain_loss():
    policy, ref, targets = _t([0.3, -1.2, 2.0]), _t([0.1, 0.0, -0.5]), _t([1.0, -2.0, 0.5])
    plain = losses.rpo_loss(policy, ref, targets).losses
    torch.testing.assert_close(losses.rpo_loss(policy, ref, targets, huber_delta=100.0).losses, plain)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, True])
def test_huber_delta_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="huber_delta"):
        losses.rpo_loss(_t([0.0]), _t([0.0]), _t([1.0]), huber_delta=bad)


def test_huber_delta_needs_the_plain_level_weight():
    with pytest.raises(ValueError, match="level_weight=1"):
        losses.rpo_loss(_t([0.0, 1.0]), _t([0.0, 0.0]), _t([1.0, 0.0]), torch.tensor([0, 0]),
                        level_weight=0.5, huber_delta=1.0)  # fmt: skip
