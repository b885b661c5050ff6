#!/usr/bin/env python3
"""Record, then check at every job start, the torch and DeepSpeed a venv
was built on.

    python scripts/venv_versions.py record VENV
    python scripts/venv_versions.py check VENV [--if-recorded]

A venv made with --system-site-packages on top of a conda module takes torch
and DeepSpeed from the module; when the module changes under it (a site
update, another default), the venv's own packages no longer match them.
`record` writes the versions this python sees to VENV/prelora-versions.txt
(scripts/polaris_venv.sh runs it after building the venv). `check` compares
them with the ones this python sees now and refuses in one line (exit 1)
when they differ or, unless --if-recorded, when nothing was recorded. Run it
with the venv active.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

PACKAGES = ("torch", "deepspeed")
RECORD = "prelora-versions.txt"


def installed(name: str) -> Optional[str]:
    """The version of ``name`` this python imports; None when absent."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        return str(__import__(name).__version__)
    except Exception:
        return None


def read_record(path: Path) -> dict[str, str]:
    """``name version`` lines as a dict."""
    words = (line.split() for line in path.read_text().splitlines())
    return {w[0]: w[1] for w in words if len(w) == 2}


def mismatch(recorded: dict[str, str], found: dict[str, Optional[str]]) -> Optional[str]:
    """What differs between the recorded and the found versions; None when
    nothing does."""
    diff = [f"{name} {recorded.get(name, '?')} -> {found.get(name) or 'missing'}"
            for name in PACKAGES if recorded.get(name) != found.get(name)]
    return ", ".join(diff) or None


def main(argv: list[str]) -> int:
    """record VENV | check VENV [--if-recorded]; 0 fine, 1 refused, 2 usage."""
    if len(argv) < 2 or argv[0] not in ("record", "check") or \
            any(a != "--if-recorded" for a in argv[2:]):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    venv, record = argv[1], Path(argv[1]) / RECORD
    found = {name: installed(name) for name in PACKAGES}
    if argv[0] == "record":
        missing = [n for n, v in found.items() if v is None]
        if missing:
            print(f"venv_versions.py: {', '.join(missing)} not importable here: nothing recorded",
                  file=sys.stderr)
            return 1
        record.write_text("".join(f"{n} {v}\n" for n, v in found.items()))
        print(f"venv_versions.py: {venv} built on "
              + ", ".join(f"{n} {v}" for n, v in found.items()))
        return 0
    if not record.is_file():
        if "--if-recorded" in argv:
            return 0
        print(f"venv_versions.py: {venv} has no record of the torch and DeepSpeed it was built "
              "on: rebuild it with scripts/polaris_venv.sh", file=sys.stderr)
        return 1
    diff = mismatch(read_record(record), found)
    if diff:
        print(f"venv_versions.py: {venv} was built on other versions than this environment has "
              f"({diff}): load the module it was built on, or rebuild it with "
              "scripts/polaris_venv.sh", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
