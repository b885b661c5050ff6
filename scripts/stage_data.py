#!/usr/bin/env python3
"""Copy a converted data set (an .h5 file or a directory of shards) to this
node's local disk and verify the copy; one process per node.

    python scripts/stage_data.py SRC DEST_DIR

The copy lands in DEST_DIR/<name of SRC>. Each file is read once from SRC,
its CRC-32 computed on the way, written under a temporary name, read back
from the local disk and compared (size and CRC-32), then renamed into place:
a copy that is there verified. scripts/stage_data.sh runs this on every node
of a job. Exit 0 copied and verified, 1 failed (one line naming the file).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import zlib
from pathlib import Path

BLOCK = 16 << 20


def crc_of(path: Path) -> int:
    """CRC-32 of a file's bytes."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def copy_verified(src: Path, dest: Path) -> int:
    """Copy ``src`` to ``dest`` and check the copy on disk; its size."""
    tmp = dest.with_name(f".{dest.name}.partial-{socket.gethostname()}-{os.getpid()}")
    crc = size = 0
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(BLOCK):
                crc = zlib.crc32(block, crc)
                size += len(block)
                fout.write(block)
        if tmp.stat().st_size != size or crc_of(tmp) != crc:
            raise OSError(f"the copy of {src} in {tmp} does not match it (size or CRC-32)")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def stage(src: Path, dest_dir: Path) -> tuple[int, int]:
    """Copy ``src`` (file or directory of files) into ``dest_dir``; (files, bytes)."""
    target = dest_dir / src.name
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src]
    if src.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        dest_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for f in files:
        total += copy_verified(f, target / f.name if src.is_dir() else target)
    return len(files), total


def main(argv: list[str]) -> int:
    """SRC DEST_DIR; 0 staged and verified, 1 failed, 2 usage."""
    if len(argv) != 2:
        print("usage: stage_data.py SRC DEST_DIR", file=sys.stderr)
        return 2
    src, dest_dir = Path(argv[0]), Path(argv[1])
    host = socket.gethostname().split(".")[0]
    if not src.exists():
        print(f"stage_data.py: {host}: {src} does not exist", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        n, size = stage(src, dest_dir)
    except OSError as e:
        print(f"stage_data.py: {host}: staging {src} to {dest_dir} failed: {e}", file=sys.stderr)
        return 1
    print(f"stage_data.py: {host}: {src} -> {dest_dir / src.name}: {n} file(s), {size:,} bytes, "
          f"verified (size, CRC-32) in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
