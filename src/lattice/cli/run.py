"""`lattice run`: the per-node agent, a drop-in for torchrun (flags parsed by argparse)."""

from __future__ import annotations

import click


@click.command(
    "run",
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(args: tuple[str, ...]) -> int:
    """Run a training script on this node as part of an elastic job (torchrun's flags)."""
    from lattice.agent.entry import main

    return main(list(args))


def register(group: click.Group) -> None:
    """Add `lattice run` to the `lattice` group."""
    group.add_command(run_command)
