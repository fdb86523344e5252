"""RPOConfig: KTOConfig's conventions, RPO's fields documented, defaults that reproduce the authors' code."""

import dataclasses

import pytest
import torch
from trl import KTOConfig, TrlParser

from trl_rpo import RPOConfig


RPO_FIELDS = [
    "beta",
    "logps_aggregation",
    "partition_estimator",
    "reward_normalization",
    "min_completions_per_prompt",
    "sparse_prompt_strategy",
    "precompute_ref_log_probs",
    "train_sampling_strategy",
    "loss_type",
]


def test_defaults_reproduce_the_authors_code(tmp_path):
    args = RPOConfig(str(tmp_path))
    assert args.beta == 5.0
    assert args.logps_aggregation == "mean"
    assert args.reward_normalization == "global"
    assert args.partition_estimator == "empirical"
    assert args.min_completions_per_prompt == 2
    assert args.sparse_prompt_strategy == "global_baseline"
    assert args.precompute_ref_log_probs is True
    assert args.train_sampling_strategy == "random"
    # KTO's conventions are kept where they make sense
    assert args.max_length == KTOConfig.max_length == 1024
    assert args.learning_rate == 1e-6
    assert args.gradient_checkpointing is True


def test_bf16_falls_back_on_a_machine_without_bf16(tmp_path):
    args = RPOConfig(str(tmp_path))
    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert RPOConfig(str(tmp_path), use_cpu=True).bf16 is True  # bf16 autocast on CPU, as the user asked for


def test_is_a_kto_config_so_kto_code_keeps_working(tmp_path):
    args = RPOConfig(str(tmp_path), beta=0.5, max_length=256, per_device_train_batch_size=2)
    assert isinstance(args, KTOConfig)
    assert args.beta == 0.5


@pytest.mark.parametrize("name", RPO_FIELDS)
def test_every_rpo_field_has_help_and_is_in_the_docstring(name):
    field = {f.name: f for f in dataclasses.fields(RPOConfig)}[name]
    assert len(field.metadata.get("help", "")) > 20
    assert f"{name} (`" in RPOConfig.__doc__


def test_parses_from_the_command_line(tmp_path):
    parser = TrlParser((RPOConfig,))
    (args,) = parser.parse_args_and_config(
        ["--output_dir", str(tmp_path), "--beta", "2.5", "--logps_aggregation", "sum", "--partition_estimator",
         "monte_carlo", "--min_completions_per_prompt", "3"]
    )  # fmt: skip
    assert (args.beta, args.logps_aggregation, args.partition_estimator) == (2.5, "sum", "monte_carlo")
    assert args.min_completions_per_prompt == 3
    with pytest.raises(SystemExit):
        parser.parse_args_and_config(["--output_dir", str(tmp_path), "--reward_normalization", "minmax"])


@pytest.mark.parametrize(
    ("option", "value"),
    [("logps_aggregation", "max"), ("partition_estimator", "exact"), ("sparse_prompt_strategy", "ignore")],
)
def test_unknown_choices_are_rejected_in_python_too(option, value, tmp_path):
    with pytest.raises(ValueError, match=f"`{option}` must be one of"):
        RPOConfig(str(tmp_path), **{option: value})


def test_min_completions_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="min_completions_per_prompt"):
        RPOConfig(str(tmp_path), min_completions_per_prompt=0)


def test_choices_are_typed_once_in_the_losses_module():
    """Editors and `--help` read the choices from `Literal` types: each option's type is the alias `trl_rpo.losses`
    defines and its functions take (one source of truth), and each config validates against those values."""
    import typing

    from trl_rpo import DROConfig, losses

    hints = typing.get_type_hints(RPOConfig)
    for option, alias in [
        ("partition_estimator", losses.Estimator), ("sparse_prompt_strategy", losses.SparsePromptStrategy),
        ("value_shrinkage", losses.ValueShrinkage), ("logps_aggregation", losses.LogpsAggregation),
        ("reward_normalization", losses.RewardNormalization),
    ]:  # fmt: skip
        assert hints[option] is alias, option
    assert typing.get_type_hints(losses.rpo_targets)["estimator"] is losses.Estimator

    shared = {"logps_aggregation": losses.LOGPS_AGGREGATIONS, "reward_normalization": losses.REWARD_NORMALIZATIONS}
    assert RPOConfig.literal_choices() == shared | {
        "partition_estimator": losses.ESTIMATORS,
        "sparse_prompt_strategy": losses.SPARSE_PROMPT_STRATEGIES,
        "value_shrinkage": losses.VALUE_SHRINKAGES,
        "loss_type": ("rpo",),
    }
    assert DROConfig.literal_choices() == shared | {"value_model_type": ("shared", "separate"), "loss_type": ("dro",)}


@pytest.mark.parametrize(
    ("config", "name"),
    [
        ("RPOConfig", "partition_estimator"),
        ("RPOConfig", "value_shrinkage"),
        ("RPOConfig", "loss_type"),
        ("DROConfig", "value_model_type"),
    ],
)
def test_each_typed_choice_is_validated(tmp_path, config, name):
    import trl_rpo

    with pytest.raises(ValueError, match=f"`{name}` must be one of"):
        getattr(trl_rpo, config)(str(tmp_path), bf16=False, **{name: "kto"})


def test_use_cpu_under_deepspeed_is_refused(monkeypatch):
    """transformers would build the model inside `zero.Init` while accelerate, told to use the CPU, never prepared
    DeepSpeed: the first forward failed on an empty weight. One error names the fix instead."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed config sets
    with pytest.raises(ValueError, match="set `use_cpu` to false"):
        RPOConfig("out", use_cpu=True)


def test_every_objective_column_is_in_the_data_vocabulary():
    """The columns an objective stores are named once in `trl_rpo.data.OBJECTIVE_COLUMNS`: sampling leaves them off
    the prompt rows it copies, and a dataset carrying them is told they are recomputed."""
    from trl_rpo.data import COMPLETION_COLUMNS, OBJECTIVE_COLUMNS
    from trl_rpo.objectives import DROObjective, RPOObjective

    for objective in (RPOObjective, DROObjective):
        assert set(objective.columns) <= set(OBJECTIVE_COLUMNS) <= COMPLETION_COLUMNS, objective.name
