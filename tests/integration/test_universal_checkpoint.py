"""Resuming a ZeRO 1 checkpoint on another number of ranks, through
DeepSpeed's universal checkpoint, in each of the three stages.

One short run per world size (1 and 2 ranks) writes a checkpoint in every
stage; each is resumed on the other world size, and what the engine holds
after the resume is compared with what DeepSpeed wrote, read here from its
own files (the per-rank optimizer partitions and the model-states file).
"""

import json
import re
from pathlib import Path

import pytest
import torch

from mpi_util import run_mpi_together, script_cmd, train_cmd
from prelora_hpc import checkpoint as ckpt

# DeepSpeed's universal checkpoint (converter and loader): make test-compat
# runs all of these against the site's DeepSpeed too.
pytestmark = pytest.mark.compat

# vit_tiny_cpu switches to stage 2 at step 4 and to stage 3 at step 6, on one
# rank as on two; a checkpoint after every step, all kept.
RUN = ["deepspeed.zero_stage=1", "optim.schedule=constant", "run.max_steps=7",
       "checkpoint.every_steps=1", "checkpoint.keep_last=10"]
TAGS = {1: "step00000003", 2: "step00000005", 3: "step00000007"}
#: (ranks that wrote the checkpoints, ranks that resume them)
DIRECTIONS = [(2, 1), (1, 2)]


def saved_state(tag_dir: Path) -> dict:
    """What DeepSpeed wrote into a ZeRO 1/2 checkpoint, whole again: each
    trainable parameter's exp_avg, exp_avg_sq and step, put together from
    every rank's optimizer partition by the fragment addresses DeepSpeed
    recorded; the weights and the trainer's progress from the model-states
    file."""
    model = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    parts = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for f in files]
    optimizer = {}
    for group, shapes in enumerate(model["param_shapes"]):
        states = [sd["base_optimizer_state"]["state"][group] for sd in parts]
        steps = {int(torch.as_tensor(s["step"]).item()) for s in states}
        assert len(steps) == 1, f"ranks disagree on group {group}'s step: {steps}"
        for name, shape in shapes.items():
            entry = {"step": next(iter(steps))}
            for key in ("exp_avg", "exp_avg_sq"):
                pieces = [s[key].narrow(0, sd["param_slice_mappings"][group][name].start,
                                        sd["param_slice_mappings"][group][name].numel)
                          for sd, s in zip(parts, states)
                          if name in sd["param_slice_mappings"][group]]
                entry[key] = torch.cat(pieces).view(shape)
            optimizer[name] = entry
    return {"world_size": len(files), "optimizer": optimizer, "module": model["module"],
            "progress": model["progress"]}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """world size -> run directory of a run with a checkpoint in every stage."""
    runs = {world: tmp_path_factory.mktemp(f"written_on_{world}") for world in (2, 1)}
    run_mpi_together([(train_cmd(out, *RUN), world) for world, out in runs.items()])
    return runs


@pytest.fixture(scope="module")
def resumed(written, tmp_path_factory):
    """(source world, target world) -> (what each resume loaded, its output).

    Resumes the stage 1, 2 and 3 checkpoints in order; 2 -> 1 resumes the
    stage-3 one a second time, which must reuse the copy the first made."""
    jobs, dirs = [], []
    for src, dst in DIRECTIONS:
        tags = [TAGS[s] for s in (1, 2, 3)] + ([TAGS[3]] if src == 2 else [])
        paths = [written[src] / "checkpoints" / t for t in tags]
        dirs.append(tmp_path_factory.mktemp(f"resumed_{src}_to_{dst}"))
        jobs.append((script_cmd("resume_state.py", dirs[-1], *paths, "--", *RUN[:2]), dst))
    # Each direction reads and converts only its own source run.
    done = run_mpi_together(jobs)
    return {direction: (torch.load(d / "resumed.pt", weights_only=False), p.stdout + p.stderr)
            for direction, d, p in zip(DIRECTIONS, dirs, done)}


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=[f"{s}to{d}" for s, d in DIRECTIONS])
@pytest.mark.parametrize("stage", [1, 2, 3], ids=lambda s: f"stage{s}")
def test_resume_on_another_world_size_loads_the_saved_optimizer_state(
        written, resumed, stage, src, dst):
    tag_dir = written[src] / "checkpoints" / TAGS[stage]
    saved = saved_state(tag_dir)
    sidecar = json.loads((tag_dir / ckpt.SIDECAR).read_text())
    assert saved["world_size"] == src and sidecar["stage"] == stage
    results, _ = resumed[(src, dst)]
    got = results[stage - 1]
    assert got["world_size"] == dst
    # The trainer's progress, stage and rank map are carried.
    assert got["progress"] == {k: saved["progress"][k] for k in got["progress"]}
    assert got["progress"]["global_step"] == sidecar["global_step"]
    assert got["stage"] == stage and got["rank_map"] == sidecar["rank_map"]
    if stage > 1:
        assert got["rank_map"] and got["rank_map"] == json.loads(
            (written[src] / "rank_map.json").read_text())
    # Every trainable tensor: AdamW's moments and step, by value.
    assert sorted(got["optimizer"]) == sorted(saved["optimizer"])
    for name, want in saved["optimizer"].items():
        have = got["optimizer"][name]
        assert have["step"] == want["step"], name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(have[key], want[key]), f"{name} {key}"
    # And every weight, frozen ones too (stage 3's base is not in the optimizer).
    assert sorted(got["params"]) == sorted(saved["module"])
    for name, value in saved["module"].items():
        assert torch.equal(got["params"][name], value), name
    if stage == 3:
        assert len(saved["module"]) > len(saved["optimizer"])  # frozen weights were checked


@pytest.mark.mpi
@pytest.mark.slow
def test_the_universal_copy_is_made_once_and_reused(written, resumed):
    results, out = resumed[(2, 1)]
    root = written[2] / "checkpoints"
    made = re.findall(r"converted (\S+) to DeepSpeed's universal format in (\S+)", out)
    assert made == [(str(root / t), str(root / (t + ckpt.UNIVERSAL))) for t in TAGS.values()], out
    assert out.count("the universal copy an earlier resume made") == 1, out
    again, first = results[3], results[2]
    for name, want in first["optimizer"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(again["optimizer"][name][key], want[key]), f"{name} {key}"
    # The originals are untouched: each still verifies against its sidecar.
    for tag in TAGS.values():
        assert ckpt.verify(ckpt.read_resume_point(root / tag)) == []


@pytest.mark.mpi
@pytest.mark.slow
def test_a_damaged_universal_copy_is_made_again(written, resumed):
    """In process, world size 1: no collective is involved."""
    point = ckpt.read_resume_point(written[2] / "checkpoints" / TAGS[2])
    copy = point.path.with_name(point.tag + ckpt.UNIVERSAL)
    victim = next(copy.glob("zero/*/exp_avg.pt"))
    good = torch.load(victim, weights_only=False)
    victim.write_bytes(victim.read_bytes()[:100])
    note = ckpt.universal_copy(point)
    assert f"checkpoint file {victim} is damaged" in note and "made again" in note, note
    assert point.universal == copy
    assert torch.equal(torch.load(victim, weights_only=False)["param"], good["param"])


def test_a_deepspeed_without_universal_checkpoints_refuses_in_one_line(tmp_path, monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.16.9")
    files = {f"rng_rank{r:05d}.pt": {"size": 0, "crc32": "0"} for r in range(2)}
    point = ckpt.ResumePoint(tmp_path / "step00000004", "step00000004", 1, 4, {}, {}, files)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_world_size(point, 1, 1)
    msg = str(e.value)
    assert "\n" not in msg and str(point.path) in msg
    assert "DeepSpeed 0.16.9 is installed" in msg and "run on 2 ranks" in msg
    # ZeRO 0 needs no conversion, whatever DeepSpeed is installed.
    assert "resumed on 1" in ckpt.check_world_size(point, 0, 1)


def fake_checkpoint(tmp_path) -> ckpt.ResumePoint:
    """A sealed tag directory of 2 ranks with nothing in it DeepSpeed could read."""
    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / ckpt.SIDECAR).write_text("{}")
    files = {f"rng_rank{r:05d}.pt": {"size": 0, "crc32": "0"} for r in range(2)}
    return ckpt.ResumePoint(tag, tag.name, 1, 4, {}, {}, files)


def test_a_failed_conversion_stops_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    def fails_half_way(args):
        (Path(args.output_folder) / "zero").mkdir(parents=True)
        raise AssertionError("Required universal_checkpoint_info state is missing\nmore detail")

    monkeypatch.setattr(ds_to_universal, "main", fails_half_way)
    point = fake_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.universal_copy(point)
    msg = str(e.value)
    assert "\n" not in msg and str(point.path) in msg and "nothing was loaded" in msg
    assert "AssertionError: Required universal_checkpoint_info state is missing" in msg
    assert point.universal is None
    assert [p.name for p in point.path.parent.iterdir()] == [point.tag]


def test_a_copy_made_by_another_deepspeed_is_made_again(tmp_path, monkeypatch):
    import deepspeed
    from deepspeed.checkpoint import ds_to_universal

    def converts(args):
        (Path(args.output_folder) / "zero").mkdir(parents=True)
        (Path(args.output_folder) / "zero" / "made_by").write_text(deepspeed.__version__)

    monkeypatch.setattr(ds_to_universal, "main", converts)
    point = fake_checkpoint(tmp_path)
    monkeypatch.setattr(deepspeed, "__version__", "0.17.6")
    assert "converted" in ckpt.universal_copy(point)
    assert "an earlier resume made" in ckpt.universal_copy(point)
    monkeypatch.setattr(deepspeed, "__version__", "0.19.8")
    note = ckpt.universal_copy(point)
    assert "made by DeepSpeed 0.17.6, 0.19.8 is installed; made again" in note, note
    assert (point.universal / "zero" / "made_by").read_text() == "0.19.8"
