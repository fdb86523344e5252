"""`python -m trl_rpo`: the `trl-rpo` command."""

from .cli import cli


if __name__ == "__main__":
    cli()
