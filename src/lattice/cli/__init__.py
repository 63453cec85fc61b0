"""The `lattice` command: one entry point for every component.

Each component's commands live in their own module here and are added with ``register(group)``.
User errors (``UserError``, bad flags) print one line and exit non-zero, never a traceback.
"""

from __future__ import annotations

import sys

import click

from lattice.common.errors import UserError


@click.group(
    name="lattice",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="lattice-elastic", prog_name="lattice")
def cli() -> None:
    """Elastic training for PyTorch: jobs that keep training while machines come, go and fail."""


def _register_all() -> None:
    from lattice.cli import checkpoint, control, operator, rendezvous, run

    for module in (run, rendezvous, checkpoint, control, operator):
        module.register(cli)


def _printable(text: str) -> str:
    """One line whatever the user typed (a flag may hold a CR or a newline)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register_all()
    try:
        rc = cli.main(args=argv, prog_name="lattice", standalone_mode=False)
    except UserError as exc:
        print(f"lattice: error: {_printable(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("lattice: aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
