"""Check the DeepSpeed compatibility environment (``make test-compat``).

    python scripts/compat_check.py VERSION SITE_DIR

DeepSpeed VERSION is installed with ``--no-deps`` into SITE_DIR, which goes
first on PYTHONPATH over the main environment. This checks that
``import deepspeed`` finds exactly that release there (not the main
environment's) and that every requirement it declares is met by the
environment underneath. Exit 0 with one summary line, or 1 with one line
per problem.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement


def problems(want: str, site: Path) -> tuple[list[str], str]:
    """(what is wrong, the summary line), for DeepSpeed ``want`` from ``site``."""
    import deepspeed
    import torch

    out = []
    where = Path(deepspeed.__file__).resolve().parent
    if deepspeed.__version__ != want:
        out.append(f"deepspeed is {deepspeed.__version__}, expected {want}")
    if site.resolve() not in where.parents:
        out.append(f"deepspeed imported from {where}, not from {site}")
    dist = md.distribution("deepspeed")  # the first on sys.path: the one imported
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(f"deepspeed {want} needs {req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"deepspeed {want} needs {req}: found {have}")
    summary = (f"DeepSpeed {deepspeed.__version__} from {where}, torch {torch.__version__}; "
               f"its requirements are met")
    return out, summary


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    found, summary = problems(argv[0], Path(argv[1]))
    for line in found:
        print(f"compat_check: {line}", file=sys.stderr)
    if not found:
        print(summary)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
