"""`python -m trl_rpo`: the `trl-rpo` command."""

from .cli import run


if __name__ == "__main__":
    run()
