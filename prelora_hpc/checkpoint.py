"""Checkpoints that survive many PBS/Slurm jobs and the stage switch.

Layout under the run directory::

    checkpoints/
      latest                      tag of the newest complete checkpoint
      step00000120/               DeepSpeed's files (collective save) +
        prelora.json              sidecar: stage, step, rank map, config keys,
                                  size and CRC-32 of every file
        rng_rank00000.pt ...      per-rank RNG states
        state_rank00000.pt ...    per-rank trainer state, if any
      step00000200-stage3/        a stage-switch checkpoint (kept forever)
      step00000124.saving/        a checkpoint being written (never resumed)
      step00000096.damaged/       one that failed verification, set aside
      step00000120.universal/     DeepSpeed's universal (world-size independent)
                                  copy, made when a ZeRO 1/2 checkpoint is
                                  resumed on another number of ranks

The sidecar is read before the engine is built, so a resume in stage 2 or 3
first injects LoRA with the saved ranks and freezes what was frozen, then
loads DeepSpeed's state into an engine of the same shape.

A save writes into ``TAG.saving``; each rank then checksums and fsyncs the
files it wrote (in parallel), rank 0 gathers the sizes and checksums into
the sidecar, fsyncs, renames the directory to ``TAG`` and only then moves
``latest``. A job killed mid-save, or a save that fails (a full disk), leaves
the previous checkpoint as latest. A resume verifies sizes and checksums
(again split over the ranks) before DeepSpeed reads anything, and falls back
to the newest checkpoint that verifies.

ZeRO 1/2 partition the optimizer state over the ranks that wrote it. To
resume on another number of ranks, rank 0 converts the checkpoint once with
DeepSpeed's ``ds_to_universal`` into ``TAG.universal`` (sealed with its own
sidecar, reused by later resumes) and the engine loads that copy with
DeepSpeed's universal loader (tested on DeepSpeed 0.17.6 and 0.19.8).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import random
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from .config import Config, ConfigError, config_to_dict

SIDECAR = "prelora.json"
LATEST = "latest"
#: Suffix of a checkpoint directory while it is written.
SAVING = ".saving"
#: Suffix given to a checkpoint directory that failed verification.
DAMAGED = ".damaged"
#: Suffix of a checkpoint's universal copy (DeepSpeed's world-size-independent layout).
UNIVERSAL = ".universal"
#: The oldest DeepSpeed whose universal checkpoint the resume was tested with.
UNIVERSAL_MIN_DEEPSPEED = (0, 17, 6)
#: DeepSpeed's name of the (one, without model parallelism) model-states file.
MODEL_STATES = "mp_rank_00_model_states.pt"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """No usable checkpoint: a damaged one named explicitly, or none that
    verifies. Raised alike on every rank."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (no space left, a quota, an I/O
    error). Raised alike on every rank, after the partial directory is gone
    and with ``latest`` untouched."""

#: Config keys whose change makes a checkpoint unusable: they decide the
#: shapes and names of what was saved.
COMPAT_KEYS = [
    "model.name", "model.img_size", "model.num_classes", "model.patch_size",
    "model.embed_dim", "model.depth", "model.num_heads", "model.in_chans",
    "lora.target_modules", "run.mode", "deepspeed.zero_stage",
]


def compat_fingerprint(cfg: Config) -> dict:
    """The values of COMPAT_KEYS in ``cfg``."""
    d = config_to_dict(cfg)
    out = {}
    for key in COMPAT_KEYS:
        section, name = key.split(".")
        out[key] = d[section][name]
    return out


@dataclass
class ResumePoint:
    """A checkpoint to resume from, as its sidecar describes it."""

    path: Path          # the tag directory
    tag: str
    stage: int
    global_step: int
    rank_map: dict[str, int]
    fingerprint: dict
    files: Optional[dict] = None
    """name -> {"size", "crc32"} as written; None in a sidecar older than checksums."""
    notes: list[str] = field(default_factory=list)
    """What a resume skipped on the way to this checkpoint, one line each."""
    universal: Optional[Path] = None
    """The universal copy the engine loads instead (``universal_copy``), when
    ZeRO 1/2 partitions of another world size are resumed; else None."""

    @property
    def load_dir(self) -> Path:
        return self.path.parent

    @property
    def world_size(self) -> Optional[int]:
        """Ranks that wrote the checkpoint (one RNG file each); None when the
        sidecar predates the file list."""
        if self.files is None:
            return None
        return sum(1 for name in self.files if re.fullmatch(r"rng_rank\d+\.pt", name))


def deepspeed_universal_support() -> Optional[str]:
    """None when the installed DeepSpeed can convert and load universal
    checkpoints as this module uses them, else why not (one phrase)."""
    import deepspeed

    version = getattr(deepspeed, "__version__", "unknown")
    parts = re.findall(r"\d+", version)[:3]
    if len(parts) < 3 or tuple(map(int, parts)) < UNIVERSAL_MIN_DEEPSPEED:
        need = ".".join(map(str, UNIVERSAL_MIN_DEEPSPEED))
        return f"DeepSpeed {version} is installed; resuming on another world size needs {need} or newer"
    try:
        from deepspeed.checkpoint import ds_to_universal  # noqa: F401
    except ImportError as e:
        return f"DeepSpeed {version} has no usable deepspeed.checkpoint.ds_to_universal ({e})"
    return None


def needs_universal(point: ResumePoint, zero_stage: int, world_size: int) -> bool:
    """Whether ``point`` holds ZeRO 1/2 partitions of another world size, so
    it resumes through its universal copy."""
    saved = point.world_size
    return saved is not None and saved != world_size and zero_stage in (1, 2)


def check_world_size(point: ResumePoint, zero_stage: int, world_size: int) -> Optional[str]:
    """Whether ``point`` can be resumed on ``world_size`` ranks.

    Returns None for the same world size, else a note: a ZeRO 0 checkpoint
    loads as it is, a ZeRO 1/2 one through its universal copy
    (``universal_copy``). Raises CheckpointError (one line, the same on
    every rank) for ZeRO 3 partitions of another world size, and for ZeRO
    1/2 ones where the installed DeepSpeed cannot convert them.
    """
    saved = point.world_size
    if saved is None or saved == world_size:
        return None
    batch = ("the global batch changes with the world size unless "
             "deepspeed.train_batch_size/grad_accum_steps keep it")
    if zero_stage >= 3:
        raise CheckpointError(
            f"checkpoint {point.path} was written by {saved} ranks under ZeRO {zero_stage}, "
            f"whose optimizer state is partitioned over them; it cannot be resumed on "
            f"{world_size} ranks (run on {saved} ranks; ZeRO 0, 1 and 2 checkpoints resume on "
            f"any number)")
    if zero_stage in (1, 2):
        why = deepspeed_universal_support()
        if why is not None:
            raise CheckpointError(
                f"checkpoint {point.path} was written by {saved} ranks under ZeRO {zero_stage} "
                f"and cannot be resumed on {world_size} ranks here: {why} (run on {saved} "
                f"ranks, or install a newer DeepSpeed)")
        return (f"checkpoint {point.path} was written by {saved} ranks under ZeRO {zero_stage}, "
                f"resumed on {world_size} through its universal copy; {batch}")
    return f"checkpoint {point.path} was written by {saved} ranks, resumed on {world_size}: {batch}"


def checkpoint_root(run_dir: Path) -> Path:
    """The directory holding a run's checkpoints and ``latest``."""
    return Path(run_dir) / "checkpoints"


def read_resume_point(path: Path) -> ResumePoint:
    """Read a tag directory's sidecar; raises FileNotFoundError naming it,
    CheckpointError when it is unreadable."""
    path = Path(path)
    side = path / SIDECAR
    if not side.is_file():
        raise FileNotFoundError(f"{path} is not a complete prelora checkpoint (no {SIDECAR})")
    try:
        meta = json.loads(side.read_text())
        return ResumePoint(path, path.name, int(meta["stage"]), int(meta["global_step"]),
                           {k: int(v) for k, v in meta["rank_map"].items()},
                           meta["fingerprint"], meta.get("files"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint file {side} is damaged (unreadable: "
                              f"{type(e).__name__}: {e})") from None


def file_digest(path: Path, fsync: bool = False) -> dict:
    """``{"size", "crc32"}`` of a file, streamed; with ``fsync`` also forces
    it to stable storage (the data was just written: it is read from the
    page cache, so the checksum costs little beside the write)."""
    crc = 0
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return {"size": size, "crc32": f"{crc:08x}"}


def file_owner(name: str, world_size: int) -> int:
    """The rank that writes (and checksums) checkpoint file ``name``.

    DeepSpeed's per-rank files carry the data-parallel rank in their name
    (``zero_pp_rank_3_...``), ours the global rank (``rng_rank00003.pt``);
    rank 0 writes the rest (``mp_rank_00_model_states.pt``).
    """
    m = re.search(r"(?:zero_pp_rank_|rng_rank|state_rank)(\d+)", name)
    return int(m.group(1)) % world_size if m else 0


def verify(point: ResumePoint, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems with the checkpoint's files, one line each (empty: it verifies).

    ``part = (i, n)`` checks only every n-th file from the i-th (sorted by
    name), so n ranks verify a checkpoint in parallel. A sidecar without
    checksums (an older checkpoint) checks nothing.
    """
    if point.files is None:
        return []
    return _verify_files(point.path, point.files, part)


def _verify_files(directory: Path, files: dict, part: tuple[int, int]) -> list[str]:
    i, n = part
    problems = []
    for name in sorted(files)[i::n]:
        want = files[name]
        f = directory / name
        if not f.is_file():
            problems.append(f"checkpoint file {f} is missing")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            problems.append(f"checkpoint file {f} is damaged ({size} bytes, "
                            f"{want['size']} written)")
            continue
        got = file_digest(f)["crc32"]
        if got != want["crc32"]:
            problems.append(f"checkpoint file {f} is damaged (CRC-32 {got}, "
                            f"{want['crc32']} written)")
    return problems


def _resolve_explicit(choice: str) -> Path:
    p = Path(choice)
    if (p / LATEST).is_file():
        return p / (p / LATEST).read_text().strip()
    if (p / "checkpoints" / LATEST).is_file():
        return p / "checkpoints" / (p / "checkpoints" / LATEST).read_text().strip()
    return p


def _candidates(cfg: Config, choice: str) -> tuple[list[Path], list[str]]:
    """Tag directories to try, newest first, and notes on what is off."""
    if choice != "auto":
        return [_resolve_explicit(choice)], []
    root = checkpoint_root(cfg.run.output_dir)
    latest = root / LATEST
    if not latest.is_file():
        return [], []
    notes = []
    first = root / latest.read_text().strip()
    if not (first / SIDECAR).is_file():
        notes.append(f"{latest} names {first}, which is not a complete checkpoint")
        first = None
    others = sorted((p for p in root.iterdir()
                     if p.is_dir() and p.name.startswith("step") and "." not in p.name
                     and p != first and (p / SIDECAR).is_file()),
                    key=lambda p: p.name, reverse=True)
    return ([first] if first else []) + others, notes


def _check_fits(cfg: Config, point: ResumePoint) -> None:
    now = compat_fingerprint(cfg)
    diff = [k for k in COMPAT_KEYS if point.fingerprint.get(k) != now[k]]
    if diff:
        details = ", ".join(f"{k}: checkpoint {point.fingerprint.get(k)!r} vs config {now[k]!r}"
                            for k in diff)
        raise ConfigError(f"checkpoint {point.path} does not fit this config ({details})")


def _read_all(cfg: Config, choice: str) -> tuple[list, list[str]]:
    """[(tag directory, its point or the error reading it raised)], notes; no collectives."""
    paths, notes = _candidates(cfg, choice)
    out = []
    for path in paths:
        try:
            point = read_resume_point(path)
            _check_fits(cfg, point)
            out.append((path, point))
        except CheckpointError as e:
            out.append((path, e))
        except (ConfigError, FileNotFoundError) as e:
            if choice != "auto" or not out:
                # The checkpoint the run would resume from does not fit or
                # does not exist: a user's mistake, said as such.
                out.append((path, e))
                break
            notes.append(str(e))
    return out, notes


def find_resume(cfg: Config, explicit: Optional[str] = None, *, rank: int = 0,
                world_size: int = 1) -> Optional[ResumePoint]:
    """The checkpoint this run resumes from, verified, or None for a fresh start.

    ``explicit`` (``--resume PATH``) wins; else ``checkpoint.resume``:
    'auto' takes the run directory's ``latest``, 'never' none, anything
    else is a tag directory. Refuses (ConfigError naming the differing
    keys) a checkpoint whose model or module set differs from ``cfg``.

    Every file is checked against the sizes and checksums in the sidecar
    before anything is loaded. With 'auto', a damaged checkpoint is set
    aside (renamed ``TAG.damaged``), ``latest`` moves to the newest one that
    verifies and the point's ``notes`` say so; an explicit damaged one, or
    none that verifies, raises CheckpointError naming the damaged file.

    With ``world_size > 1`` this is a collective: every rank calls it, rank
    0 reads the directory and the sidecars, the ranks verify a share of the
    files each, and all return the same answer (or raise the same error).
    """
    choice = explicit or cfg.checkpoint.resume
    if choice == "never":
        return None
    collective = world_size > 1
    payload = [None]
    if rank == 0:
        try:
            payload[0] = _read_all(cfg, choice)
        except OSError as e:
            # Raised on every rank below: a rank-0-only error would leave
            # the others waiting in the broadcast.
            payload[0] = f"cannot read the checkpoints of {cfg.run.output_dir}: {e}"
    if collective:
        tdist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise CheckpointError(payload[0])
    items, notes = payload[0]
    if not items:
        return None
    damaged: list[tuple[Path, list[str]]] = []
    point = None
    for path, item in items:
        if isinstance(item, (ConfigError, FileNotFoundError)):
            raise type(item)(str(item))
        if isinstance(item, CheckpointError):
            problems = [str(item)]
        else:
            problems = verify(item, (rank, world_size))
            if collective:
                gathered = [None] * world_size
                tdist.all_gather_object(gathered, problems)
                problems = [p for ps in gathered for p in ps]
        if not problems:
            point = item
            break
        if choice != "auto":
            raise CheckpointError(f"{problems[0]}; refusing to resume from it "
                                  "(checkpoint.resume=auto resumes from the newest one that "
                                  "verifies)")
        damaged.append((path, problems))
    if point is None:
        root = checkpoint_root(cfg.run.output_dir)
        what = "; ".join(ps[0] for _, ps in damaged)
        raise CheckpointError(f"no checkpoint in {root} verifies ({what}); nothing was loaded: "
                              "restore the files, or start over with checkpoint.resume=never "
                              "or another --output-dir")
    for path, problems in damaged:
        more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
        notes.append(f"{problems[0]}{more}; set aside as {path.name + DAMAGED}; resuming from "
                     f"{point.path}, the newest checkpoint that verifies")
    if rank == 0 and damaged:
        for path, _ in damaged:
            _set_aside(path)
        _atomic_write(point.load_dir / LATEST, point.tag)
    if point.files is None:
        notes.append(f"checkpoint {point.path} has no checksums (written by an older "
                     "version): not verified")
    point.notes = notes
    return point


def _set_aside(path: Path) -> None:
    target = path.with_name(path.name + DAMAGED)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED}{n}")
    os.replace(path, target)
    copy = path.with_name(path.name + UNIVERSAL)
    if copy.exists():
        os.replace(copy, target.with_name(target.name + UNIVERSAL))


def universal_copy(point: ResumePoint, rank: int = 0, world_size: int = 1) -> str:
    """Collective: make or reuse ``point``'s universal copy and set ``point.universal``.

    Rank 0 converts the checkpoint with DeepSpeed's ``ds_to_universal`` into
    ``TAG.universal.saving`` while the other ranks wait, seals it with its
    own sidecar (size and CRC-32 of every file, and the CRC-32 of the
    checkpoint's sidecar it came from) and renames it ``TAG.universal``. A
    copy left by an earlier resume is verified, split over the ranks, and
    reused when it is whole and belongs to this checkpoint; otherwise it is
    made again. Returns one line saying which; raises CheckpointError on
    every rank when the conversion fails (nothing is loaded then).
    """
    target = point.path.with_name(point.tag + UNIVERSAL)
    source = file_digest(point.path / SIDECAR)["crc32"] if rank == 0 else None
    collective = world_size > 1
    found = [_read_universal_sidecar(target, source) if rank == 0 else None]
    if collective:
        tdist.broadcast_object_list(found, src=0)
    files, why_not = found[0]
    if files is not None:
        problems = _verify_files(target, files, (rank, world_size))
        if collective:
            gathered = [None] * world_size
            tdist.all_gather_object(gathered, problems)
            problems = [p for ps in gathered for p in ps]
        if not problems:
            point.universal = target
            return f"resuming through {target}, the universal copy an earlier resume made"
        why_not = f"{problems[0]}; made again"
    outcome = [_convert_to_universal(point, target, source) if rank == 0 else None]
    if collective:
        # The other ranks wait here, within run.collective_timeout_s.
        tdist.broadcast_object_list(outcome, src=0)
    error, seconds = outcome[0]
    if error is not None:
        raise CheckpointError(error)
    point.universal = target
    made = f"converted {point.path} to DeepSpeed's universal format in {target} ({seconds:.1f} s)"
    return made + (f" ({why_not})" if why_not else "")


def _read_universal_sidecar(target: Path, source_crc: str) -> tuple[Optional[dict], Optional[str]]:
    """(files of a reusable copy, None) or (None, why it is not reusable or None when absent)."""
    import deepspeed

    side = target / SIDECAR
    if not target.exists():
        return None, None
    try:
        meta = json.loads(side.read_text())
        files, made_from, made_by = meta["files"], meta["source_sidecar_crc32"], meta["deepspeed"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"the universal copy {target} is unreadable ({type(e).__name__}); made again"
    if made_from != source_crc:
        return None, f"the universal copy {target} belongs to an earlier checkpoint; made again"
    if made_by != deepspeed.__version__:
        # The layout is DeepSpeed's own; its loader is only known to read its converter's.
        return None, (f"the universal copy {target} was made by DeepSpeed {made_by}, "
                      f"{deepspeed.__version__} is installed; made again")
    return files, None


def _convert_to_universal(point: ResumePoint, target: Path, source_crc: str
                          ) -> tuple[Optional[str], float]:
    """Rank 0: convert and seal; returns (error line or None, seconds taken)."""
    import deepspeed
    from deepspeed.checkpoint import ds_to_universal

    staging = target.with_name(target.name + SAVING)
    t0 = time.perf_counter()
    try:
        for stale in (staging, target):
            if stale.exists():
                shutil.rmtree(stale)
        # One process, no pool: forked workers of a process that already ran
        # OpenMP (training, or torch itself) can hang.
        args = argparse.Namespace(input_folder=str(point.path), output_folder=str(staging),
                                  num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True,
                                  # Engines that never set universal_checkpoint_info
                                  # (no tensor or pipeline parallelism) need this.
                                  inject_missing_state=True)
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
        # It also writes a `latest_universal` beside its output; the tag is
        # always passed explicitly here.
        (staging.parent / "latest_universal").unlink(missing_ok=True)
        files = {str(f.relative_to(staging)): file_digest(f, fsync=True)
                 for f in sorted(staging.rglob("*")) if f.is_file()}
        meta = {"source": point.tag, "source_world_size": point.world_size,
                "source_sidecar_crc32": source_crc, "deepspeed": deepspeed.__version__,
                "checksum": "crc32", "files": files}
        _atomic_write(staging / SIDECAR, json.dumps(meta, indent=1))
        os.replace(staging, target)
        _fsync_dir(target.parent)
    except Exception as e:  # noqa: BLE001 - the waiting ranks must hear of any failure
        shutil.rmtree(staging, ignore_errors=True)
        if _is_write_failure(e):
            reason = _describe_write_failure(e, staging, 0, 1)
        else:
            lines = str(e).strip().splitlines()
            reason = (f"DeepSpeed's ds_to_universal failed: {type(e).__name__}"
                      + (f": {lines[0]}" if lines else ""))
        return (f"checkpoint {point.path} could not be converted to DeepSpeed's universal "
                f"format for another world size: {reason}; nothing was loaded"), 0.0
    return None, time.perf_counter() - t0


@contextlib.contextmanager
def _loading_universal(engine):
    """The engine's universal loader, for this load only.

    DeepSpeed reads ``checkpoint.load_universal`` from its config when a
    load starts, never while the engine is built (DeepSpeed 0.17.6 and
    0.19.8), so the engine of the stage loads the universal copy unchanged.
    """
    from deepspeed.utils import logger

    config = engine._config
    before, level = config.load_universal_checkpoint, logger.level
    config.load_universal_checkpoint = True
    # Its loader warns on every rank that no model-parallel unit was given,
    # which is the case of every run here.
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
        logger.setLevel(level)


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


#: Messages of torch / DeepSpeed write failures that carry no errno.
_WRITE_FAILURE = re.compile(r"iostream error|file write failed|No space left|unexpected pos|"
                            r"PytorchStreamWriter", re.I)


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, RuntimeError)
                                      and bool(_WRITE_FAILURE.search(str(e))))


def _newest_own_file(directory: Path, rank: int, world_size: int) -> Optional[Path]:
    try:
        mine = [p for p in directory.iterdir()
                if p.is_file() and file_owner(p.name, world_size) == rank]
    except OSError:
        return None
    return max(mine, key=lambda p: p.stat().st_mtime_ns, default=None)


def _describe_write_failure(e: BaseException, directory: Path, rank: int,
                            world_size: int) -> str:
    """'no space left on the device writing PATH (N bytes free)' or the like."""
    path = getattr(e, "filename", None) or _newest_own_file(directory, rank, world_size) \
        or directory
    try:
        free = shutil.disk_usage(directory.parent).free
    except OSError:
        free = None
    code = getattr(e, "errno", None)
    # torch's writers drop the errno; a file system with (nearly) nothing
    # left tells the same story.
    if code == errno.ENOSPC or (code is None and free is not None and free < (1 << 20)):
        return f"no space left on the device writing {path} ({free} bytes free)"
    if code == errno.EDQUOT:
        return f"disk quota exceeded writing {path}"
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
    return f"could not write {path}: {reason}"


def _seal_own_files(directory: Path, rank: int, world_size: int) -> dict:
    """Checksum and fsync the files of ``directory`` this rank wrote."""
    return {p.name: file_digest(p, fsync=True) for p in sorted(directory.iterdir())
            if p.is_file() and file_owner(p.name, world_size) == rank}


def save(engine, cfg: Config, rank: int, tag: str, client_state: dict,
         stage: int, global_step: int, rank_map: dict[str, int],
         rank_state: Optional[dict] = None) -> Path:
    """Collective: every rank writes its part, then rank 0 seals the checkpoint.

    ``client_state`` is the trainer's state, the same on every rank (saved
    once, by DeepSpeed); ``rank_state`` what differs per rank (statistics of
    the layers a rank measures), saved per rank, read back by ``load_rank_state``.

    Returns the tag directory. ``latest`` points at it only once all ranks
    have written, checksummed and fsynced their files; older periodic
    checkpoints beyond ``checkpoint.keep_last`` are removed then
    (stage-switch checkpoints are kept). A write that fails on any rank (a
    full disk) raises CheckpointWriteError on every rank, after the partial
    directory is removed; ``latest`` stays on the previous checkpoint.
    """
    world = tdist.get_world_size()
    root = checkpoint_root(cfg.run.output_dir)
    staging = root / (tag + SAVING)
    ready = [None]
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Left by a job killed mid-save; the run lock says no one else writes here.
            for p in root.glob("*" + SAVING):
                shutil.rmtree(p, ignore_errors=True)
        except OSError as e:
            ready[0] = _describe_write_failure(e, root, 0, world)
    # Agreed before DeepSpeed's collective save starts, so no rank enters it alone.
    tdist.broadcast_object_list(ready, src=0)
    if ready[0] is not None:
        raise CheckpointWriteError(f"checkpoint {tag} not written: {ready[0]}")
    error, files, in_deepspeed = None, {}, True
    try:
        engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state,
                               save_latest=False)
        in_deepspeed = False
        torch.save(rng_state(), staging / f"rng_rank{rank:05d}.pt")
        if rank_state is not None:
            torch.save(rank_state, staging / f"state_rank{rank:05d}.pt")
        files = _seal_own_files(staging, rank, world)
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e):
            raise
        error = _describe_write_failure(e, staging, rank, world)
        if in_deepspeed:
            # DeepSpeed's save ends with a barrier the other ranks are in;
            # join it, so the collectives below line up.
            tdist.barrier()
    gathered = [None] * world
    tdist.all_gather_object(gathered, (error, files))
    errors = [e for e, _ in gathered if e]
    if not errors and rank == 0:
        manifest = {}
        for _, f in gathered:
            manifest.update(f)
        meta = {"stage": stage, "global_step": global_step, "rank_map": rank_map,
                "fingerprint": compat_fingerprint(cfg), "checksum": "crc32", "files": manifest}
        try:
            _seal(root, staging, tag, meta)
        except OSError as e:
            errors.append(_describe_write_failure(e, staging, 0, world))
    verdict = [errors[0] if errors else None]
    tdist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            latest = root / LATEST
            where = (f"latest still names {latest.read_text().strip()}" if latest.is_file()
                     else "no earlier checkpoint")
        else:
            where = ""
        tdist.barrier()
        msg = [f"checkpoint {tag} not written: {verdict[0]}; the partial checkpoint was "
               f"removed, {where}"]
        tdist.broadcast_object_list(msg, src=0)
        raise CheckpointWriteError(msg[0])
    if rank == 0:
        _prune(root, cfg.checkpoint.keep_last, keep=tag)
    tdist.barrier()
    return root / tag


def _seal(root: Path, staging: Path, tag: str, meta: dict) -> None:
    """Rank 0: sidecar, then the directory's final name, then ``latest``;
    each made durable before the next (a crash in between leaves the
    previous checkpoint as latest)."""
    _atomic_write(staging / SIDECAR, json.dumps(meta, indent=1))
    final = root / tag
    old = root / (tag + ".old")
    if final.exists():
        # Saving a step that is already on disk (a resume at the very end).
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        # Its universal copy was made from the files being replaced.
        shutil.rmtree(root / (tag + UNIVERSAL), ignore_errors=True)
    os.replace(staging, final)
    _fsync_dir(root)
    try:
        _atomic_write(root / LATEST, tag)
    except OSError:
        shutil.rmtree(final, ignore_errors=True)
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load(engine, point: ResumePoint, rank: int) -> dict:
    """Collective: load DeepSpeed's state and this rank's RNG; returns the
    trainer's client state.

    With a universal copy (``point.universal``) the weights come from the
    checkpoint's model-states file, which ZeRO 1/2 write whole: DeepSpeed's
    universal loader restores only the parameters its optimizer trains,
    never frozen ones (stage 3's base weights). The optimizer state, fp32
    masters and step counts then come from the universal copy.
    """
    if point.universal is None:
        path, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    else:
        saved = torch.load(point.path / MODEL_STATES, map_location="cpu", weights_only=False)
        engine.module.load_state_dict(saved["module"], strict=True)
        del saved
        with _loading_universal(engine):
            path, client = engine.load_checkpoint(str(point.universal.parent),
                                                  tag=point.universal.name,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {point.universal or point.path}")
    rng = point.path / f"rng_rank{rank:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return client


def load_rank_state(point: ResumePoint, rank: int) -> Optional[dict]:
    """This rank's ``rank_state`` saved with the checkpoint, or None."""
    f = point.path / f"state_rank{rank:05d}.pt"
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot fsync a directory; their renames are
        # durable by other means.
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    periodic = sorted(p for p in root.iterdir()
                      if p.is_dir() and p.name.startswith("step") and "-stage" not in p.name
                      and "." not in p.name and (p / SIDECAR).is_file())
    for p in periodic[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    # Universal copies go with their checkpoint.
    for copy in root.glob("*" + UNIVERSAL):
        if not copy.with_name(copy.name[:-len(UNIVERSAL)]).exists():
            shutil.rmtree(copy, ignore_errors=True)
