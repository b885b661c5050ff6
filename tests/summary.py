"""Lines for sections of pytest's terminal summary ("Slurm jobs", "Soak",
"cluster"), written by tests and fixtures while they run.

A line travels in the report of the test that was running when it was
written (its ``user_properties``), and the process that prints the summary
collects it from there: under ``pytest -n`` the tests run in worker
processes and only the reports reach the process that prints.
"""

from __future__ import annotations

#: The name under which a line rides in a report's user_properties.
PROPERTY = "prelora-summary"

#: (section, key, line) written in this process since the last report.
_pending: list[tuple[str, str, str]] = []


class Section:
    """One section: ``append(line)`` adds a line, ``section[key] = line``
    adds or replaces the line of that key ("key: line" in the summary)."""

    def __init__(self, name: str):
        self.name = name

    def append(self, line: str) -> None:
        _pending.append((self.name, line, line))

    def __setitem__(self, key: str, line: str) -> None:
        _pending.append((self.name, key, f"{key}: {line}"))


def take_pending() -> list[tuple[str, str, str]]:
    """The lines written since the last call, oldest first."""
    out = list(_pending)
    _pending.clear()
    return out
