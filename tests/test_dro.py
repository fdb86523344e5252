"""The DRO baseline (Richemond et al., arXiv 2405.19107): its loss maths, its configuration and DROTrainer."""

import json
import math

import pytest
import torch
from conftest import assert_only_adapter_moved, reward_rows
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file

from trl_rpo import DROConfig, DROLossOutput, DROTrainer, RPOConfig, dro_loss


# ------------------------------------------------------------------------------------------------ dro_loss
def test_dro_loss_hand_computed():
    policy = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    rewards = torch.tensor([1.0, -0.5])
    values = torch.tensor([0.2, 0.1])
    out = dro_loss(policy, ref, rewards, values, beta=2.0)
    assert isinstance(out, DROLossOutput)
    # log-ratios 0.5 and -1.0; residuals 1 - 0.2 - 2·0.5 = -0.2 and -0.5 - 0.1 + 2·1 = 1.4
    torch.testing.assert_close(out.log_ratios, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.residuals, torch.tensor([-0.2, 1.4]))
    torch.testing.assert_close(out.losses, torch.tensor([0.02, 0.98]))


def _random_inputs(batch: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    policy = (-torch.rand(batch, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(batch, generator=g, dtype=torch.float64) * 3
    rewards = torch.randn(batch, generator=g, dtype=torch.float64)
    values = torch.randn(batch, generator=g, dtype=torch.float64).requires_grad_()
    return policy, ref, rewards, values


@pytest.mark.parametrize("beta", [0.3, 1.0, 5.0])
def test_dro_loss_gradients_match_the_closed_form(beta):
    policy, ref, rewards, values = _random_inputs()
    out = dro_loss(policy, ref, rewards, values, beta=beta)
    out.losses.mean().backward()
    delta = rewards - values.detach() - beta * (policy.detach() - ref)
    torch.testing.assert_close(out.residuals, delta)
    torch.testing.assert_close(policy.grad, -beta * delta / policy.numel(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values.grad, -delta / values.numel(), rtol=1e-12, atol=1e-12)
    assert not out.log_ratios.requires_grad
    assert not out.residuals.requires_grad


def test_dro_loss_gradcheck():
    policy, ref, rewards, values = _random_inputs(batch=5, seed=1)
    assert torch.autograd.gradcheck(
        lambda p, v: dro_loss(p, ref, rewards, v, beta=0.7).losses.mean(), (policy, values)
    )


def test_dro_loss_constants_get_no_gradient():
    policy, ref, rewards, values = _random_inputs(batch=3)
    ref.requires_grad_()
    rewards.requires_grad_()
    dro_loss(policy, ref, rewards, values, beta=1.0).losses.sum().backward()
    assert ref.grad is None
    assert rewards.grad is None


@pytest.mark.parametrize("data_weights", ["uniform", "skewed"])
def test_population_minimiser_is_the_tilted_reference(data_weights):
    """One prompt, all 5 completions enumerable: minimising over free log π and V gives π* ∝ π_ref·exp(r/τ)."""
    tau = 0.5
    g = torch.Generator().manual_seed(2)
    ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    rewards = torch.randn(5, generator=g, dtype=torch.float64)
    # Rows of the offline data are drawn from any distribution with full support: the minimiser does not depend on it.
    weights = torch.full((5,), 0.2, dtype=torch.float64)
    if data_weights == "skewed":
        weights = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64) * 2, 0)
    logits = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    value = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [logits, value], max_iter=500, tolerance_grad=1e-12, tolerance_change=0.0, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        out = dro_loss(torch.log_softmax(logits, 0), ref, rewards, value.expand(5), beta=tau)
        loss = (weights * out.losses).sum()
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    expected_logps = torch.log_softmax(ref + rewards / tau, 0)
    expected_value = tau * torch.logsumexp(ref + rewards / tau, 0)
    torch.testing.assert_close(torch.log_softmax(logits, 0).detach(), expected_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(value.detach()[0], expected_value, rtol=0, atol=1e-6)


def test_dro_loss_rejects_bad_inputs():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="share a shape"):
        dro_loss(x, x, x, torch.zeros(2), beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        dro_loss(x, x, x, x, beta=0.0)


# -------------------------------------------------------------------------------------------- DROConfig
def test_config_defaults(tmp_path):
    args = DROConfig(str(tmp_path), bf16=False)
    assert not isinstance(args, RPOConfig)  # siblings: neither trainer accepts the other's config
    assert args.beta == 1.0
    assert args.value_model_type == "shared"
    assert args.value_learning_rate is None
    assert args.rescale_policy_lr is False
    assert args.loss_type == "dro"
    assert (args.logps_aggregation, args.reward_normalization) == ("mean", "global")  # shared with RPOConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value_model_type": "mlp"}, "value_model_type"),
        ({"value_model_name_or_path": "x"}, "only used with"),
        ({"value_learning_rate": -1.0}, "value_learning_rate"),
        ({"loss_type": "rpo"}, "loss_type"),
        ({"desirable_weight": 2.0}, "KTO option"),
    ],
)
def test_config_rejects_options_without_meaning(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DROConfig(str(tmp_path), bf16=False, **kwargs)


@pytest.mark.parametrize("name", ["partition_estimator", "min_completions_per_prompt", "sparse_prompt_strategy"])
def test_config_has_no_rpo_only_option(tmp_path, name):
    """RPO's per-prompt partition options do not exist on DROConfig (DRO learns V_φ(x)), so setting one fails."""
    assert name in RPOConfig.__dataclass_fields__
    assert name not in DROConfig.__dataclass_fields__
    with pytest.raises(TypeError, match=name):
        DROConfig(str(tmp_path), bf16=False, **{name: RPOConfig.__dataclass_fields__[name].default})


# ------------------------------------------------------------------------------------------- DROTrainer
@pytest.fixture
def make_dro_args(make_args):
    def make(**kwargs) -> DROConfig:
        return make_args(config_class=DROConfig, **kwargs)

    return make


def _head(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.value_model.head.named_parameters()}


def _split_groups(trainer) -> tuple[list[dict], list[dict]]:
    """The optimizer's (value, policy) parameter groups."""
    value = {id(p) for p in trainer.value_model.parameters()}
    groups = trainer.optimizer.param_groups
    is_value = [any(id(p) in value for p in g["params"]) for g in groups]
    return [g for g, v in zip(groups, is_value, strict=True) if v], [
        g for g, v in zip(groups, is_value, strict=True) if not v
    ]


@pytest.mark.parametrize("value_model_type", ["shared", "separate"])
def test_policy_and_value_train_with_their_own_lr(model_dir, make_dro_args, reward_dataset, value_model_type):
    args = make_dro_args(value_model_type=value_model_type, value_learning_rate=0.05, learning_rate=0.01)
    trainer = DROTrainer(model_dir, args=args, train_dataset=reward_dataset)
    assert all(torch.count_nonzero(p) == 0 for p in trainer.value_model.head.parameters())  # V_φ = 0 at step 0
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    head_before = _head(trainer)
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(policy_before[name], param), f"policy {name} did not change"
    for name, param in trainer.value_model.head.named_parameters():
        assert not torch.equal(head_before[name], param), f"value head {name} did not change"
    assert all(p.grad is None for p in trainer.value_model.parameters())  # cleared after each optimizer step
    groups, policy_groups = _split_groups(trainer)
    assert groups
    assert all(g["name"] == "value" and g["initial_lr"] == 0.05 for g in groups)
    value_params = {id(p) for g in groups for p in g["params"]}
    assert value_params == {id(p) for p in trainer.value_model.parameters()}
    assert policy_groups
    assert all(g["initial_lr"] == 0.01 for g in policy_groups)
    policy_params = {id(p) for p in trainer.model.parameters()}
    if value_model_type == "separate":  # a model of its own: no parameter shared with the policy
        assert trainer.value_model.backbone is not None
        assert not value_params & policy_params
    else:
        assert trainer.value_model.backbone is None


def test_rescale_policy_lr(model_dir, make_dro_args, reward_dataset):
    args = make_dro_args(beta=2.0, rescale_policy_lr=True, max_steps=1)
    trainer = DROTrainer(model_dir, args=args, train_dataset=reward_dataset)
    trainer.train()
    value_groups, policy_groups = _split_groups(trainer)
    assert all(g["initial_lr"] == 0.1 for g in value_groups)  # value_learning_rate=None: learning_rate, unscaled
    assert all(g["initial_lr"] == 0.05 for g in policy_groups)


def test_first_loss_and_metrics(model_dir, make_dro_args):
    # One batch of 12 rows: the first logged loss is over every row, with π_θ = π_ref and V_φ = 0.
    args = make_dro_args(per_device_train_batch_size=12, max_steps=1, eval_strategy="steps", eval_steps=1)
    data = Dataset.from_dict(reward_rows())
    trainer = DROTrainer(model_dir, args=args, train_dataset=data, eval_dataset=data)
    assert "target" not in trainer.train_dataset.column_names
    trainer.train()
    log = trainer.state.log_history[0]
    assert {"loss", "value", "log_ratio", "residual_rms", "target", "logps/policy", "rewards/accuracies"} <= log.keys()
    r_z = torch.tensor(list(trainer.train_dataset["reward_z"]), dtype=torch.float64)
    assert log["loss"] == pytest.approx(0.5 * float((r_z**2).mean()), rel=1e-5)
    assert log["value"] == 0.0
    assert log["log_ratio"] == 0.0
    assert log["residual_rms"] == pytest.approx(math.sqrt(2 * log["loss"]), rel=1e-5)
    assert {"eval_loss", "eval_value", "eval_residual_rms"} <= trainer.state.log_history[1].keys()


def test_normalised_rewards_as_rpo(model_dir, make_dro_args, reward_dataset):
    trainer = DROTrainer(model_dir, args=make_dro_args(), train_dataset=reward_dataset)
    r = torch.tensor(list(reward_dataset["reward"]), dtype=torch.float64)
    expected = (r - r.mean()) / r.std(correction=0)
    torch.testing.assert_close(torch.tensor(list(trainer.train_dataset["reward_z"]), dtype=torch.float64), expected)


def test_single_completion_prompts_are_trained(model_dir, make_dro_args):
    data = Dataset.from_dict(reward_rows(num_prompts=6, completions_per_prompt=1))
    # with gradient checkpointing, which must not hide the hidden state the shared head reads
    trainer = DROTrainer(model_dir, args=make_dro_args(gradient_checkpointing=True), train_dataset=data)
    assert len(trainer.train_dataset) == 6
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


@pytest.mark.parametrize("value_model_type", ["shared", "separate"])
def test_lora_trains_adapter_and_value_head(model_dir, make_dro_args, reward_dataset, value_model_type):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = make_dro_args(value_model_type=value_model_type)
    trainer = DROTrainer(model_dir, args=args, train_dataset=reward_dataset, peft_config=peft_config)
    assert trainer.ref_model is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    head_before = _head(trainer)
    trainer.train()
    assert_only_adapter_moved(before, trainer.model)
    assert all(p.requires_grad for p in trainer.value_model.head.parameters())
    for name, param in trainer.value_model.head.named_parameters():
        assert not torch.equal(head_before[name], param), f"value head {name} did not change"


def test_saved_output_holds_the_value_head_and_card(model_dir, make_dro_args, reward_dataset, tmp_path):
    trainer = DROTrainer(model_dir, args=make_dro_args(), train_dataset=reward_dataset)
    assert {"trl", "dro", "trl-rpo"} <= set(trainer.model.model_tags)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    saved = load_file(out / "value_head.safetensors")
    for name, param in trainer.value_model.named_parameters():
        torch.testing.assert_close(saved[name], param.detach().cpu(), rtol=0, atol=0)
    assert json.loads((out / "value_head_config.json").read_text())["value_model_type"] == "shared"
    trainer.create_model_card(model_name="tiny-dro")
    card = (out / "README.md").read_text()
    for expected in ("DRO", "2405.19107", "richemond2024offline", "trl-rpo"):
        assert expected in card


def test_resume_restores_the_value_head(model_dir, make_dro_args, reward_dataset, tmp_path):
    # Checkpoint at an epoch boundary (12 rows, batches of 4), as in RPO's resume test.
    common = {"max_steps": 6, "learning_rate": 1e-2, "save_strategy": "steps", "save_steps": 3, "seed": 3}
    full = DROTrainer(model_dir, args=make_dro_args(**common), train_dataset=reward_dataset)
    full.train()
    losses = [log["loss"] for log in full.state.log_history if "loss" in log]
    resumed = DROTrainer(
        model_dir, args=make_dro_args(**common, output_dir=str(tmp_path / "resumed")), train_dataset=reward_dataset
    )
    assert (tmp_path / "out" / "checkpoint-3" / "value_head.safetensors").exists()
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    # A value head restarted from zero would show from the first resumed step on.
    resumed_losses = {log["step"]: log["loss"] for log in resumed.state.log_history if "loss" in log}
    assert [resumed_losses[step] for step in (4, 5, 6)] == pytest.approx(losses[3:], rel=1e-5)


def test_rpo_config_is_refused(model_dir, make_args, reward_dataset):
    with pytest.raises(TypeError, match="DROConfig"):
        DROTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)


def test_dro_config_is_refused_by_rpo_trainer(model_dir, make_dro_args, reward_dataset):
    """Given a DROConfig, RPOTrainer would train RPO with DRO's τ = 1: a clear error instead."""
    from trl_rpo import RPOTrainer

    with pytest.raises(TypeError, match="must be a `RPOConfig`, got `DROConfig`"):
        RPOTrainer(model_dir, args=make_dro_args(), train_dataset=reward_dataset)


@pytest.mark.parametrize("value_model_type", ["shared", "separate"])
def test_encoder_decoder_policy(t5_dir, make_dro_args, reward_dataset, value_model_type):
    # "shared" reads the encoder's last prompt token; "separate" mean-pools a T5 encoder of its own.
    args = make_dro_args(value_model_type=value_model_type)
    trainer = DROTrainer(t5_dir, args=args, train_dataset=reward_dataset)
    assert trainer.is_encoder_decoder
    head_before = _head(trainer)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    for name, param in trainer.value_model.head.named_parameters():
        assert not torch.equal(head_before[name], param), f"value head {name} did not change"


def test_neither_trainer_carries_the_other_objectives_columns(model_dir, make_args, make_dro_args, reward_dataset):
    """RPO stores targets and values, DRO the normalised reward: each split, collator and batch holds its own."""
    from trl_rpo import RPOTrainer

    rpo = RPOTrainer(model_dir, args=make_args(), train_dataset=reward_dataset)
    dro = DROTrainer(model_dir, args=make_dro_args(), train_dataset=reward_dataset)
    for trainer, own, other in [(rpo, {"target", "value"}, {"reward_z"}), (dro, {"reward_z"}, {"target", "value"})]:
        batch = next(iter(trainer.get_train_dataloader()))
        assert own | {"ref_logps", "reward", "group_key"} <= set(batch)
        carried = set(batch) | set(trainer.train_dataset.column_names) | set(trainer.data_collator.value_columns)
        assert not other & carried
