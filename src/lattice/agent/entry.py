"""`lattice run` from parsed-nothing to exit code: parse flags, set up logging, run the agent."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from lattice.agent.agent import Agent
from lattice.agent.options import parse_run_args


def configure_logging() -> None:
    """Agent messages go to stderr as ``[lattice HH:MM:SS.mmm] ...`` (workers use ``[rankN]``)."""
    logger = logging.getLogger("lattice.agent")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("[lattice %(asctime)s.%(msecs)03d] %(message)s", datefmt="%H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("LATTICE_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


def main(argv: list[str]) -> int:
    """Run `lattice run ARGV`; returns the exit code (UserError propagates to the CLI)."""
    opts = parse_run_args(argv)
    configure_logging()
    return asyncio.run(Agent(opts).run())
