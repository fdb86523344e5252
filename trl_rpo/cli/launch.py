"""One relaunch through `accelerate launch`, for every command that runs on several processes (`trl-rpo` training
and `trl-rpo generate`), as `trl kto --accelerate_config` does."""

from pathlib import Path

from accelerate.commands.launch import launch_command, launch_command_parser
from trl import TrlParser
from trl.cli.accelerate_config import resolve_accelerate_config_argument
from trl.cli.commands.training import _subtract_subsequence


# The accelerate configs ship inside the package (also reachable as `recipes/accelerate_configs/` in a checkout).
ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "accelerate_configs"


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME|PATH` → `--config_file PATH`: an existing file, else `recipes/accelerate_configs/
    NAME.yaml` in the working directory (your own configs), else `NAME.yaml` among the configs shipped inside trl_rpo
    (so it works from an installed wheel), else one of the configs TRL ships under that name."""
    if "--accelerate_config" in launch_args:
        index = launch_args.index("--accelerate_config") + 1
        name = launch_args[index] if index < len(launch_args) else ""
        for folder in (Path.cwd() / "recipes" / "accelerate_configs", ACCELERATE_CONFIGS):
            candidate = folder / f"{name}.yaml"
            if name and not Path(name).is_file() and candidate.is_file():
                launch_args = [*launch_args[:index], str(candidate), *launch_args[index + 1 :]]
                break
    return resolve_accelerate_config_argument(launch_args)


def relaunch(parser: TrlParser, argv: list[str], command: str | None = None) -> None:
    """Run `trl-rpo [command] ARGS` again under `accelerate launch`: the options the command's parser does not know
    (`--num_processes 8`, `--main_process_port`, …) go to accelerate, the others to the relaunched command."""
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config(config_remaining + cli_remaining)
    script_args = _subtract_subsequence(argv, cli_remaining)
    module_args = ["--module", "trl_rpo.cli", *([command] if command else []), *script_args]
    launch_command(launch_command_parser().parse_args([*launch_args, *module_args]))
