"""ImageNet-style image folders to HDF5 (one file, or a directory of shards).

    prelora-convert /data/imagenet /lus/eagle/projects/P/imagenet1k.h5
    mpiexec -n 8 prelora-convert /data/imagenet /lus/eagle/projects/P/imagenet1k --shards 8

The source is any ImageFolder tree, ``SRC/<split>/<class>/**/<image>``
(jpg, jpeg, png, bmp, any case). Class indices are the sorted class-folder
names of all converted splits together, so every split shares one list.
Images are stored as their original encoded bytes (no re-encoding), after
each one has been decoded once with PIL to prove it is readable.

Nothing that looks final is written until everything succeeded: shards
are written under ``OUT.tmp-<host>-<pid>-<random>`` beside OUT and renamed
at the end, so an interrupted run leaves no OUT, and the next run removes
the stale staging entry. Under MPI, shard ``s`` is written by rank ``s % world_size``
(HDF5 files have one writer); use at least as many shards as ranks.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..runlock import pid_alive
from .errors import DataError
from .layout import DATASETS, FORMAT_VERSION, IMAGE_DTYPE, STRING_DTYPE, shard_name

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
ON_CORRUPT = ("fail", "skip")
_CHUNK = 1024  # rows per HDF5 chunk and per write: 16 KiB of vlen pointers
_STALE_AFTER_S = 15 * 60  # a live writer touches its staging files far more often
_PLAIN_PROGRESS_EVERY_S = 30.0


@dataclass
class _Plan:
    """What every rank needs to write its shards (rank 0 scans, then broadcasts)."""

    classes: list[str]
    items: dict[str, list[tuple[str, int]]]  # split -> [(path relative to SRC, label)]
    staging: Path  # the temporary file (one shard) or directory (several)
    shard_paths: list[Path]  # where each shard is written inside staging


# --------------------------------------------------------------------------- #
# Scanning the source tree.


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_folders(split_dir: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .DS_Store dirs) are never classes.
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path, src: Path) -> list[str]:
    """Image paths below ``folder`` (recursively), relative to ``src``, sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(src)
        found.extend((rel / f).as_posix() for f in sorted(files) if _is_image(f))
    return sorted(found)


def scan_tree(src_dir: str | Path,
              splits: Sequence[str]) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Classes and ``{split: [(relative path, label), ...]}`` of an ImageFolder tree.

    Classes are the sorted union of the class-folder names of all ``splits``.
    Raises FileNotFoundError when SRC is missing, DataError when a split
    folder is missing or holds no images.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    per_split = {}
    for split in splits:
        d = src / split
        if not d.is_dir():
            raise DataError(f"{src}: no '{split}' folder (expected {d}/<class>/<image>)")
        per_split[split] = _class_folders(d)
    classes = sorted(set().union(*per_split.values()))
    label = {c: i for i, c in enumerate(classes)}
    items = {}
    for split in splits:
        items[split] = [(rel, label[c]) for c in per_split[split]
                        for rel in _images_under(src / split / c, src)]
        if not items[split]:
            raise DataError(f"{src / split}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                            "in class folders")
    return classes, items


# --------------------------------------------------------------------------- #
# Staging area: temporary names beside OUT, stale ones from dead runs removed.


def _staging_prefix(out: Path) -> str:
    return f"{out.name}.tmp-"


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _newest_mtime(path: Path) -> float:
    if path.is_dir():
        return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()])
    return path.stat().st_mtime


def _is_stale(entry: Path, prefix: str, host: str) -> bool:
    """Whether a staging entry belongs to a run that is no longer writing it.

    The name carries the writer's host and pid; on this host a dead pid is
    proof. A writer on another host (shared file system) is presumed dead
    when nothing in the entry changed for a while.
    """
    owner = entry.name[len(prefix):].rsplit("-", 2)  # host names may contain '-'
    if len(owner) == 3 and owner[0] == host and owner[1].isdigit():
        return not pid_alive(int(owner[1]))
    try:
        return time.time() - _newest_mtime(entry) > _STALE_AFTER_S
    except FileNotFoundError:
        return False  # its owner just renamed or removed it


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_staging(out: str | Path) -> list[Path]:
    """Remove staging entries of OUT left by interrupted runs; returns what it removed."""
    out = Path(out)
    prefix = _staging_prefix(out)
    host = socket.gethostname()
    removed = []
    if out.parent.is_dir():
        for entry in out.parent.glob(prefix + "*"):
            if _is_stale(entry, prefix, host):
                _remove(entry)
                removed.append(entry)
    return removed


def _exists(out: Path) -> bool:
    # An empty directory is a place prepared for shards, not a result.
    return out.is_file() or (out.is_dir() and any(out.iterdir()))


def _plan(src: Path, out: Path, splits: Sequence[str], num_shards: int, overwrite: bool) -> _Plan:
    if _exists(out) and not overwrite:
        raise DataError(f"{out} already exists; remove it or pass --overwrite")
    classes, items = scan_tree(src, splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    # The random part keeps two conversions in one process (threads) apart.
    staging = out.parent / f"{_staging_prefix(out)}{_owner_tag()}-{secrets.token_hex(4)}"
    if num_shards == 1:
        shard_paths = [staging]
    else:
        staging.mkdir()
        shard_paths = [staging / shard_name(s, num_shards) for s in range(num_shards)]
    return _Plan(classes, items, staging, shard_paths)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished staging entry to OUT in one rename."""
    if _exists(out):
        if not overwrite:
            raise DataError(f"{out} appeared while converting; the result is left in {staging}")
        if out.is_file() and staging.is_file():
            os.replace(staging, out)  # atomic: readers see the old or the new file
            return
        old = out.parent / f"{_staging_prefix(out)}{_owner_tag()}-old{secrets.token_hex(4)}"
        os.replace(out, old)
        os.replace(staging, out)
        _remove(old)
        return
    if out.is_dir():
        out.rmdir()  # empty (checked above); rename cannot replace it with a file
    os.replace(staging, out)


# --------------------------------------------------------------------------- #
# Checking and writing images.


def decode_problem(data: bytes) -> Optional[str]:
    """None if ``data`` decodes fully with PIL, else a short reason."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except UnidentifiedImageError:
        return "not a recognisable image file"
    # PIL's decoders raise many unrelated types on bad input (OSError,
    # SyntaxError, ValueError, struct.error, DecompressionBombError...).
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


class _Progress:
    """A tqdm bar on a terminal, an occasional plain line in a batch log."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.total, self.done, self.desc = total, 0, desc
        self.enabled = enabled
        self.t0 = self.t_print = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=desc, smoothing=0.1)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self.t_print >= _PLAIN_PROGRESS_EVERY_S:
            self.t_print = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} images, {rate:.0f} img/s, "
                  f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _append(group: h5py.Group, images: list, labels: list, names: list) -> None:
    """Append the buffered rows to the split's three datasets, then empty the buffers."""
    n0 = group["labels"].shape[0]
    n1 = n0 + len(labels)
    for name in DATASETS:
        group[name].resize((n1,))
    group["labels"][n0:n1] = np.asarray(labels, dtype=np.int64)
    group["filenames"][n0:n1] = np.asarray(names, dtype=object)
    rows = np.empty(len(images), dtype=IMAGE_DTYPE)
    for j, data in enumerate(images):
        rows[j] = np.frombuffer(data, dtype=np.uint8)
    # Low-level write: h5py's slice assignment turns equal-length byte rows
    # into a 2-D array and then refuses it.
    file_space = group["images"].id.get_space()
    file_space.select_hyperslab((n0,), (n1 - n0,))
    group["images"].id.write(h5py.h5s.create_simple((n1 - n0,)), file_space, rows)
    images.clear()
    labels.clear()
    names.clear()


def _write_shard(path: Path, src: Path, classes: list[str], items: dict[str, list[tuple[str, int]]],
                 shard: int, num_shards: int, on_corrupt: str,
                 progress: _Progress) -> tuple[dict[str, int], list[str]]:
    """Write one shard file; returns ({split: images written}, skipped files as 'path: reason')."""
    written, skipped = {}, []
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_classes"] = len(classes)
        f.attrs["shard_index"] = shard
        f.attrs["num_shards"] = num_shards
        f.create_dataset("classes", data=np.asarray(classes, dtype=object), dtype=STRING_DTYPE)
        for split, split_items in items.items():
            g = f.create_group(split)
            for name, dtype in (("images", IMAGE_DTYPE), ("labels", np.int64),
                                ("filenames", STRING_DTYPE)):
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(_CHUNK,))
            images, labels, names = [], [], []
            n_skipped = 0
            for rel, label in split_items:
                file = src / rel
                try:
                    data = file.read_bytes()
                except OSError as e:
                    problem = f"cannot read: {e.strerror or e}"
                else:
                    problem = decode_problem(data)
                if problem is not None:
                    if on_corrupt == "fail":
                        raise DataError(f"corrupt image {file}: {problem} "
                                        "(--on-corrupt skip leaves such files out)")
                    skipped.append(f"{file}: {problem}")
                    n_skipped += 1
                else:
                    images.append(data)
                    labels.append(label)
                    names.append(rel)
                    if len(labels) == _CHUNK:
                        _append(g, images, labels, names)
                progress.update(1)
            if labels:
                _append(g, images, labels, names)
            g.attrs["num_skipped"] = n_skipped
            written[split] = g["labels"].shape[0]
    return written, skipped


def _shard_items(items: dict[str, list[tuple[str, int]]], shard: int, num_shards: int):
    """Contiguous slice ``shard`` of every split, so shards concatenate in order."""
    out = {}
    for split, lst in items.items():
        n = len(lst)
        out[split] = lst[shard * n // num_shards:(shard + 1) * n // num_shards]
    return out


# --------------------------------------------------------------------------- #
# The conversion.


def _write_shards(plan: _Plan, src: Path, shards: list[int], num_shards: int, on_corrupt: str,
                  bar: _Progress) -> tuple[Optional[Exception], dict[str, int], list[str]]:
    """Write this rank's shards; returns (error or None, {split: images}, skipped files)."""
    written: dict[str, int] = {}
    skipped: list[str] = []
    try:
        for s in shards:
            w, sk = _write_shard(plan.shard_paths[s], src, plan.classes,
                                 _shard_items(plan.items, s, num_shards), s, num_shards,
                                 on_corrupt, bar)
            for k, v in w.items():
                written[k] = written.get(k, 0) + v
            skipped += sk
    except (DataError, OSError) as e:
        # Returned, not raised: every rank must still reach the gather.
        return e, written, skipped
    finally:
        bar.close()
    return None, written, skipped


def _gather(comm, result):
    return comm.allgather(result) if comm is not None else [result]


def convert(src_dir: str | Path, out_path: str | Path, *, splits: Sequence[str] = ("train", "val"),
            num_shards: int = 1, on_corrupt: str = "fail", comm=None, progress: bool = True,
            overwrite: bool = False) -> list[Path]:
    """Convert ``SRC/<split>/<class>/<image>`` into HDF5 at ``out_path``.

    num_shards == 1 writes one file OUT; more write a directory OUT holding
    ``shard-00000-of-0000N.h5`` ... (see layout.py). ``on_corrupt``: 'fail'
    stops at the first image PIL cannot decode, naming it, and writes
    nothing final; 'skip' leaves such images out and reports each one.
    ``comm`` (an mpi4py communicator, or None for one process): every rank
    of it must call this with the same arguments; shard s is written by rank
    s % size. An existing OUT is refused unless ``overwrite``.

    Returns the written files (OUT, or the shard files in order), the same
    on every rank. Raises DataError / FileNotFoundError with a one-line
    message naming the offending path.
    """
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    splits = list(splits)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names, got {splits}")
    src, out = Path(src_dir), Path(out_path)
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    t0 = time.perf_counter()

    plan, error = None, None
    if rank == 0:
        try:
            plan = _plan(src, out, splits, num_shards, overwrite)
        except (DataError, OSError) as e:
            error = e
    if comm is not None:
        plan, error = comm.bcast((plan, error), root=0)
    if error is not None:
        raise error

    mine = list(range(rank, num_shards, world))
    total = sum(len(v) for s in mine for v in _shard_items(plan.items, s, num_shards).values())
    bar = _Progress(total, progress and rank == 0, f"prelora-convert rank {rank}" if world > 1
                    else "prelora-convert")
    if rank == 0 and progress and num_shards < world:
        print(f"prelora-convert: {world} ranks but {num_shards} shard(s): ranks {num_shards}.."
              f"{world - 1} have nothing to do (use --shards {world} or more)", file=sys.stderr)
    published = False
    try:
        results = _gather(comm, _write_shards(plan, src, mine, num_shards, on_corrupt, bar))
        errors = [e for e, _, _ in results if e is not None]
        if errors:
            raise errors[0]
        error = None
        if rank == 0:
            try:
                _publish(plan.staging, out, overwrite)
            except (DataError, OSError) as e:
                error = e
        if comm is not None:
            error = comm.bcast(error, root=0)
        if error is not None:
            raise error
        published = True
    finally:
        if not published:
            for s in mine:
                _remove(plan.shard_paths[s])
            if rank == 0:
                _remove(plan.staging)

    if rank == 0 and progress:
        _report(out, results, time.perf_counter() - t0)
    elif rank == 0:
        _report_skipped(results)
    return [out] if num_shards == 1 else [out / shard_name(s, num_shards) for s in range(num_shards)]


def _report_skipped(results) -> None:
    skipped = [s for _, _, sk in results for s in sk]
    if skipped:
        print(f"prelora-convert: skipped {len(skipped)} corrupt image(s):", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)


def _report(out: Path, results, seconds: float) -> None:
    _report_skipped(results)
    counts: dict[str, int] = {}
    for _, written, _ in results:
        for k, v in written.items():
            counts[k] = counts.get(k, 0) + v
    total = sum(counts.values())
    parts = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"prelora-convert: wrote {out} ({parts} images) in {seconds:.1f} s, "
          f"{total / max(seconds, 1e-9):.0f} img/s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prelora-convert",
        description="Convert ImageNet-style folders SRC/<split>/<class>/<image> to HDF5. "
                    "Under mpiexec, shards are written in parallel (shard s by rank s %% N).")
    p.add_argument("src", metavar="SRC_DIR", help="root holding one folder per split")
    p.add_argument("out", metavar="OUT", help="output .h5 file, or directory when --shards > 1")
    p.add_argument("--splits", default="train,val", help="comma-separated split folders (default: train,val)")
    p.add_argument("--shards", type=int, default=1, help="number of shard files (default 1: one file)")
    p.add_argument("--on-corrupt", choices=ON_CORRUPT, default="fail",
                   help="an image PIL cannot decode stops the conversion (fail, default) "
                        "or is left out (skip)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    return p


def _world_comm():
    """COMM_WORLD when launched on several ranks, else None."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def main(argv: Optional[list[str]] = None) -> int:
    """``prelora-convert``: 0 on success, 1 on a data error, 2 on bad arguments, 130 if interrupted."""
    args = _parser().parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    if args.shards < 1:
        print("prelora-convert: error: --shards must be >= 1", file=sys.stderr)
        return 2
    comm = _world_comm()
    rank = comm.Get_rank() if comm is not None else 0
    try:
        convert(args.src, args.out, splits=splits, num_shards=args.shards,
                on_corrupt=args.on_corrupt, comm=comm, progress=not args.no_progress,
                overwrite=args.overwrite)
    except (DataError, OSError, ValueError) as e:
        if rank == 0:
            print(f"prelora-convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print(f"prelora-convert: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
