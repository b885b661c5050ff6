"""Plots and a short Markdown summary of finished (or running) runs, the
what-if replay of the switch, and the scaling report (``prelora-report``).

Everything is read from the run directory: ``metrics.jsonl`` (the records
the trainer writes on rank 0, typed in ``prelora_hpc.records``) and
``config.yaml``. The package's modules, each one job:

- ``read``: a run's records as a ``Run`` and the numbers derived from them;
  scaling rows and their efficiency. No matplotlib.
- ``plots``: every PNG (matplotlib, Agg backend).
- ``markdown``: ``report.md``, ``runs.md``, ``scaling.md`` and the printed text.
- ``cli``: what is written where, the command line and its exit codes.

Importing the package loads none of them; ``main`` loads the command.
"""

from __future__ import annotations

from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-report`` (see ``cli.main``): the process exit code."""
    from .cli import main as cli_main

    return cli_main(argv)
