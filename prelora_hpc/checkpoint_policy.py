"""When the trainer saves, under which name, and where it resumes from.

``checkpoint.py`` knows how to write and verify one checkpoint; this module
holds the policy: every ``checkpoint.every_steps`` optimizer steps, at each
stage switch (so a run can resume in the new stage without redoing the
switch), at the end of the run, and when a stop signal (walltime, Ctrl-C)
ends it early. Every save is collective and lands on an optimizer-step
boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Protocol

from . import checkpoint as ckpt
from .config import Config


class Checkpointable(Protocol):
    """What a checkpoint captures of the trainer besides DeepSpeed's own state."""

    rank_map: dict[str, int]

    def state_dict(self) -> dict: ...

    def rank_state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...

    def load_rank_state_dict(self, d: Optional[dict]) -> None: ...


def step_tag(step: int, stage: Optional[int] = None) -> str:
    """``step00001234`` or, for the first checkpoint of a stage, ``step00001234-stage3``."""
    return f"step{step:08d}" + (f"-stage{stage}" if stage is not None else "")


class CheckpointManager:
    """Saves ``owner``'s state with its current engine at the moments the policy names.

    ``say`` receives one line per checkpoint written (rank 0 prints it).
    """

    def __init__(self, cfg: Config, rank: int, say: Callable[[str], None]):
        self.cfg = cfg
        self.rank = rank
        self.say = say
        self.every_steps = cfg.checkpoint.every_steps

    def resume_point(self, explicit: Optional[str], world_size: int,
                     warn: Callable[[str], None]) -> Optional[ckpt.ResumePoint]:
        """Collective: the verified checkpoint to resume from (``explicit``, or
        the run directory's latest as ``checkpoint.resume`` says), the same on
        every rank; None starts the run afresh. Checkpoints set aside as
        damaged, and a world-size change, are said through ``warn``.

        ZeRO 1/2 partitions written by another number of ranks are converted
        once to DeepSpeed's universal format, beside the checkpoint, which
        ``restore`` then loads (a line through ``say`` tells which copy).
        """
        point = ckpt.find_resume(self.cfg, explicit, rank=self.rank, world_size=world_size)
        if point is None:
            return None
        for note in point.notes if self.rank == 0 else []:
            warn(note)
        zero = self.cfg.deepspeed.zero_stage
        note = ckpt.check_world_size(point, zero, world_size)
        if note and self.rank == 0:
            warn(note)
        if ckpt.needs_universal(point, zero, world_size):
            self.say(ckpt.universal_copy(point, self.rank, world_size))
        return point

    def restore(self, engine, owner: Checkpointable, point: ckpt.ResumePoint) -> None:
        """Collective: load ``point`` into ``engine`` (weights, optimizer) and
        ``owner`` (its progress, and this rank's own state).

        The state ``owner`` loads also holds ``saved_world_size``, the number
        of ranks that wrote it (None in a checkpoint without a file list), for
        progress counted per rank, such as a rank's share of an epoch.
        """
        state = ckpt.load(engine, point, self.rank)
        state["saved_world_size"] = point.world_size
        owner.load_state_dict(state)
        owner.load_rank_state_dict(ckpt.load_rank_state(point, self.rank))

    def save(self, engine, owner: Checkpointable, stage: int, step: int,
             tag: Optional[str] = None) -> Path:
        """Collective: write the checkpoint of optimizer step ``step`` (tag
        ``step_tag(step)`` unless given) and return its directory."""
        path = ckpt.save(engine, self.cfg, self.rank, tag or step_tag(step), owner.state_dict(),
                         stage, step, owner.rank_map, rank_state=owner.rank_state_dict())
        self.say(f"checkpoint {path}")
        return path

    def periodic(self, engine, owner: Checkpointable, stage: int, step: int) -> Optional[Path]:
        """Collective: save if ``checkpoint.every_steps`` divides ``step``."""
        if self.every_steps and step % self.every_steps == 0:
            return self.save(engine, owner, stage, step)
        return None

    def at_switch(self, engine, owner: Checkpointable, stage: int, step: int) -> Path:
        """Collective: the first checkpoint of ``stage``, written right after
        the rebuild, named ``step_tag(step, stage)``."""
        return self.save(engine, owner, stage, step, step_tag(step, stage))

    def at_end(self, engine, owner: Checkpointable, stage: int, step: int) -> Path:
        """Collective: the run's final checkpoint."""
        return self.save(engine, owner, stage, step)

    def at_stop(self, engine, owner: Checkpointable, stage: int, step: int) -> Path:
        """Collective: the checkpoint a stop signal asks for before the process exits."""
        return self.save(engine, owner, stage, step)
