"""Every recipe parses with the real `trl-rpo` parser (unknown keys rejected), keeps the handbook layout, states the
authors' settings where it claims to, and every command in the recipes names files that exist."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser
from trl import get_peft_config

from trl_rpo.cli import make_parser, resolve_accelerate_config


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/rpo/config_*.yaml"))
# per-device batch, accumulation steps, max_length of the authors' code, per model size
PAPER = {"flan-t5-small": (16, 2, 512), "flan-t5-large": (4, 8, 512), "flan-t5-xl": (2, 16, 256)}
PAPER_RECIPES = [path for path in RECIPES if path.parts[-3] in PAPER]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def parse(path: Path, tmp_path: Path, *extra: str):
    # `--use_cpu`: the GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a bf16 GPU.
    args = ["--config", str(path), "--output_dir", str(tmp_path), "--use_cpu", "true", *extra]
    return make_parser().parse_args_and_config(args=args)


def header(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line for line in lines[: lines.index("# Model arguments")] if line.startswith("#")]


def commands(lines: list[str]) -> list[list[str]]:
    """The shell commands among `lines` (a line, or a Markdown code span, that starts with a known program)."""
    found = []
    for line in lines:
        for span in re.findall(r"`([^`]+)`", line) or [line.lstrip("# ")]:
            span = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", span)  # environment assignments before the program
            if span.startswith(("trl-rpo ", "accelerate launch ", "python -m ", "python -c ")):
                found.append(shlex.split(span))
    return found


def test_expected_recipes_exist():
    assert {_name(p) for p in RECIPES} == {
        *(f"recipes/{model}/rpo/config_{variant}.yaml" for model in PAPER for variant in ("full", "lora")),
        *(f"recipes/qwen2.5-0.5b-instruct/rpo/config_{variant}.yaml" for variant in ("full", "lora", "qlora")),
        "recipes/tiny/rpo/config_cpu.yaml",
        # public datasets in their own shape (tests/test_dataset_recipes.py)
        *(f"recipes/qwen2.5-0.5b-instruct/rpo/config_{data}.yaml" for data in ("ultrafeedback", "helpsteer2", "shp")),
        "recipes/llama-3-8b-instruct/rpo/config_armorm_lora.yaml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=_name)
def test_recipe_parses_and_keeps_the_layout(path, tmp_path):
    _, training_args, model_args, _ = parse(path, tmp_path)
    assert training_args.output_dir == str(tmp_path)  # the command line wins over the YAML
    config = yaml.safe_load(path.read_text())
    assert next(iter(config)) == "model_name_or_path"
    assert config["output_dir"].startswith("data/")
    assert config["seed"] == 42
    assert config["report_to"] == "none"
    text = path.read_text()
    for section in ("# Model arguments", "# Data training arguments", "# RPOTrainer arguments"):
        assert f"\n{section}\n" in text, section
    assert ("\n# LoRA arguments\n" in text) == model_args.use_peft
    if model_args.use_peft:
        assert get_peft_config(model_args) is not None
    # the header runs this very file
    assert f"trl-rpo --config {_name(path)}" in "\n".join(header(path))


def test_misspelled_key_is_rejected(tmp_path):
    recipe = tmp_path / "config.yaml"
    recipe.write_text("model_name_or_path: some/model\nlearning_rat: 1.0e-4\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse(recipe, tmp_path)


def test_unknown_flag_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--learning_rat"):
        parse(ROOT / "recipes/tiny/rpo/config_cpu.yaml", tmp_path, "--learning_rat", "1e-4")


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_name)
def test_paper_recipes_use_the_authors_settings(path, tmp_path):
    script_args, args, model_args, _ = parse(path, tmp_path)
    batch, accumulation, max_length = PAPER[path.parts[-3]]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (batch, accumulation)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32
    assert args.max_length == max_length
    assert model_args.model_name_or_path == f"google/{path.parts[-3]}"
    assert (script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_test_split) == (
        "bilalfaye/ultrafeedback-rpo-split",
        "train",
        "validation",
    )
    assert (script_args.prompt_column, script_args.completion_column, script_args.reward_column) == (
        "instruction",
        "response",
        "reward",
    )
    assert args.beta == 5.0
    assert (args.logps_aggregation, args.reward_normalization, args.partition_estimator) == (
        "mean",
        "global",
        "empirical",
    )
    assert (args.optim, args.weight_decay, args.learning_rate) == ("adamw_torch", 0.01, 1e-4)
    assert (args.lr_scheduler_type, args.warmup_steps, args.num_train_epochs) == ("linear", 150, 1)
    assert args.seed == 42
    assert args.bf16 is True
    assert args.gradient_checkpointing is True
    assert args.disable_dropout is False  # the authors keep T5's dropout on
    if model_args.use_peft:
        assert model_args.lora_task_type == "SEQ_2_SEQ_LM"
        assert model_args.lora_target_modules == ["q", "k", "v", "o"]


def test_t5_lora_targets_exist_in_t5():
    from peft import get_peft_model
    from transformers import AutoModelForSeq2SeqLM, T5Config

    tiny_t5 = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    _, _, model_args, _ = make_parser().parse_args_and_config(
        args=["--config", str(ROOT / "recipes/flan-t5-small/rpo/config_lora.yaml"), "--use_cpu", "true"]
    )
    model = get_peft_model(AutoModelForSeq2SeqLM.from_config(tiny_t5), get_peft_config(model_args))
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q", "k", "v", "o"}


def test_qwen_recipes(tmp_path):
    folder = ROOT / "recipes/qwen2.5-0.5b-instruct/rpo"
    lrs = {}
    for variant in ("full", "lora", "qlora"):
        _, args, model_args, dataset_args = parse(folder / f"config_{variant}.yaml", tmp_path)
        lrs[variant] = args.learning_rate
        assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
        assert [d.path for d in dataset_args.datasets] == ["HuggingFaceH4/ultrafeedback_binarized"]
        assert model_args.use_peft == (variant != "full")
        assert model_args.load_in_4bit == (variant == "qlora")
        if variant != "full":
            assert model_args.lora_target_modules == "all-linear"
    assert model_args.bnb_4bit_quant_type == "nf4"
    assert lrs == {"full": 1e-6, "lora": 1e-5, "qlora": 1e-4}  # QLoRA adapters are bf16: larger steps


def _named_files(command: list[str]) -> list[str]:
    return [
        token
        for token in command
        if token.startswith("recipes/") or token.endswith((".yaml", ".yml", ".json", ".jsonl", ".py"))
    ]


def test_commands_name_existing_files():
    readme = (ROOT / "recipes/README.md").read_text().splitlines()
    sources = {"recipes/README.md": commands(readme)} | {_name(p): commands(header(p)) for p in RECIPES}
    for source, found in sources.items():
        assert found, f"no command in {source}"
        for command in found:
            for name in _named_files(command):
                assert (ROOT / name).exists(), f"{source}: `{shlex.join(command)}` names {name}, which does not exist"
    # files the README names in code spans (the table's first column is relative to recipes/)
    for span in re.findall(r"`([^`\s<>]+\.(?:yaml|jsonl))`", "\n".join(readme)):
        assert (ROOT / span).exists() or (ROOT / "recipes" / span).exists(), span
    # the README's table has a row for every recipe, with the same command as the recipe's header
    readme_commands = [shlex.join(c) for c in sources["recipes/README.md"]]
    for path in RECIPES:
        assert f"trl-rpo --config {_name(path)}" in readme_commands, _name(path)


def test_tiny_recipe_data_is_shipped(tmp_path):
    script_args, *_ = parse(ROOT / "recipes/tiny/rpo/config_cpu.yaml", tmp_path)
    assert (ROOT / script_args.dataset_name).is_file()


def test_commands_parse(tmp_path):
    """Every `trl-rpo` (or `accelerate launch -m trl_rpo.cli`) command in the README and the headers parses."""
    lines = (ROOT / "recipes/README.md").read_text().splitlines()
    lines += [line for path in RECIPES for line in header(path)]
    found = 0
    for command in commands(lines):
        if command[0] == "accelerate":
            command = command[command.index("trl_rpo.cli") :]
        elif command[0] != "trl-rpo":
            continue
        args = [str(ROOT / token) if token.startswith("recipes/") else token for token in command[1:]]
        if args == ["--help"]:
            continue
        if "--accelerate_config" in args:  # split as `trl-rpo` does: training options, then accelerate's
            *_, config_rest, cli_rest = make_parser().parse_args_and_config(
                [*args, "--output_dir", str(tmp_path), "--use_cpu", "true"],
                return_remaining_strings=True,
                separate_remaining_strings=True,
            )
            launch_args = resolve_accelerate_config(config_rest + cli_rest)
            assert Path(launch_args[1]).is_file(), launch_args
            launch_command_parser().parse_args([*launch_args, "--module", "trl_rpo.cli"])
        else:
            parse(ROOT / args[1], tmp_path, *args[2:])  # `--config <path>` first, then the overrides
        found += 1
    # README recipe table + headers, the override example, the six accelerate rows and the plain accelerate example
    assert found == 2 * len(RECIPES) + 1 + 6 + 1


@pytest.mark.parametrize("path", sorted((ROOT / "recipes/accelerate_configs").glob("*.yaml")), ids=_name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).num_processes >= 1
