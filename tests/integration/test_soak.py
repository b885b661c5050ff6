"""Soak: a run interrupted by SIGTERM again and again, over all three stages and
both switches, resumed each time, ends exactly where the uninterrupted run ends:
bit-identical weights, identical metrics. PRELORA_SOAK_LONG=1 runs a longer
variant (more epochs, more interruptions)."""

import json
import os
import random

import pytest
import torch

from mpi_util import run_mpi, script_cmd, train_cmd
from run_helpers import read_metrics
from prelora_hpc.records import RECORD_TYPES, read_records

# Resume in every stage, exactly: make test-compat runs it against the site's
# DeepSpeed too.
pytestmark = [pytest.mark.mpi, pytest.mark.slow, pytest.mark.compat]

LONG = os.environ.get("PRELORA_SOAK_LONG") == "1"
CONFIG = "configs/vit_tiny_cpu.yaml"
# vit_tiny_cpu on 2 ranks: 8 steps per epoch, stage 2 from step 4, stage 3
# from step 6. The default schedule (warm-up, cosine) on purpose: the
# learning rate must continue exactly across every resume.
EPOCHS = 6 if LONG else 2
TOTAL = 8 * EPOCHS
BASE = ["logging.interval_steps=1", "checkpoint.every_steps=3", f"run.epochs={EPOCHS}",
        "data.num_workers=2"]
#: Fields that measure time or memory, not the training.
UNSTABLE = {"time", "images_per_s", "wall_s", "peak_memory_bytes"}
KINDS = ("step", "window", "switch", "epoch", "end")


def stop_steps(rng: random.Random) -> list[int]:
    """Steps after which a run is stopped: one in stage 1, one at or after
    the first switch (step 4) in stage 2, one in stage 3 (past the second
    switch, step 6). The segments between them cross both switches; a stop
    at step 4 or 6 falls on a switch itself."""
    spans = [(1, 3), (4, 5), (6, TOTAL - 1)]
    if LONG:
        spans = [(1, 3), (4, 5), (6, 7)] + [(a, a + 3) for a in range(8, TOTAL - 3, 4)]
    return sorted({rng.randint(a, b) for a, b in spans})


def record_view(run_dir) -> dict:
    """(kind, step[, window]) -> the record's training-determined fields; a
    resumed run's record of the same key replaces the earlier one."""
    out = {}
    for r in read_metrics(run_dir):
        if r["kind"] in KINDS:
            key = (r["kind"], r.get("step"), r.get("window"))
            out[key] = {k: v for k, v in r.items() if k not in UNSTABLE}
    return out


def final_weights(run_dir) -> dict:
    path = run_dir / "checkpoints" / f"step{TOTAL:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def test_interrupted_again_and_again_ends_bit_identical(tmp_path, soak_report):
    seed = int(os.environ.get("PRELORA_SOAK_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    stops = stop_steps(rng)
    ref = tmp_path / "uninterrupted"
    run_mpi(train_cmd(ref, *BASE))

    run = tmp_path / "interrupted"
    for s in stops:
        rank = rng.randrange(2)
        p = run_mpi(script_cmd("sigterm_at_step.py", s - 1, rank, "--config", CONFIG,
                               "--output-dir", run, *BASE), check=False)
        assert p.returncode == 85, f"seed {seed}, stop at {s}: {p.stderr[-3000:]}"
        assert f"stopping at step {s} on SIGTERM" in p.stdout, f"seed {seed}: {p.stdout[-2000:]}"
    p = run_mpi(train_cmd(run, *BASE))
    assert f"at step {stops[-1]}" in p.stdout and "in stage 3 (LoRA only)" in p.stdout
    # Each resume past the first switch took the rank map the run chose.
    assert (run / "rank_map.json").read_text() == (ref / "rank_map.json").read_text()

    starts = read_metrics(run, "start")
    assert [s["resumed_step"] for s in starts] == [0, *stops]
    assert {s["stage"] for s in starts} == {1, 2, 3}, f"seed {seed}: {stops}"

    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    max_dw = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    soak_report.append(f"{len(stops)} interruptions by SIGTERM at steps {stops} of {TOTAL} "
                       f"(seed {seed}), max |dw| = {max_dw:g}")
    assert max_dw == 0.0, f"seed {seed}"
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Every line the interrupted run wrote (all kinds: stops too) reads back
    # as one of the schema's records and writes back to the same line.
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]
    parsed = read_records(run)
    assert [r.to_json() for r in parsed] == lines
    assert {r.kind for r in parsed} == set(RECORD_TYPES)

    want, got = record_view(ref), record_view(run)
    assert sorted(got) == sorted(want), f"seed {seed}"
    for key in want:
        assert got[key] == want[key], f"seed {seed}: {key}"
