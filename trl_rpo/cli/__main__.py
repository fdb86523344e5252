"""`python -m trl_rpo.cli` (what `accelerate launch` relaunches): the `trl-rpo` command."""

from . import run


if __name__ == "__main__":
    run()
