"""records: the typed schema of metrics.jsonl and of a scaling row."""

from __future__ import annotations

import json
import math

import pytest

from prelora_hpc import records
from prelora_hpc.records import (EndRecord, EpochRecord, ScalingRow, StartRecord, StepRecord,
                                 StopRecord, SwitchRecord, WindowRecord, parse_record,
                                 read_records)

ONE_OF_EACH = [
    StartRecord(time=1.5, mode="prelora", world_size=2, global_batch=64, steps_per_epoch=20,
                total_steps=100, window_steps=5, params_total=1000, trainable=1000, stage=1,
                resumed_from="runs/x/checkpoints/step10", resumed_step=10),
    StepRecord(time=2.0, step=11, epoch=0, stage=1, loss=2.25, lr=1e-3, images_per_s=120.5),
    WindowRecord(time=3.0, window=3, step=15, epoch=0, stage=1, loss=2.0,
                 dW={"attn.qkv": 0.5, "mlp.fc1": -0.25}, dL=-1.5,
                 du={"attn.qkv": 2.0, "mlp.fc1": 1.0}, tau=1.0, zeta=10.0, criterion="update",
                 tau_update=0.5, modules=["attn.qkv", "mlp.fc1"], norms=[[1.0, 2.0], [3.0, 4.0]],
                 base_norms=[[1.0, 2.0], [3.0, 4.0]], updates=[[2.0, 2.0], [1.0, 1.0]],
                 energy_ranks=[[4, 8], [8, 16]]),
    SwitchRecord(time=4.0, step=15, epoch=0, stage=2, reason="|dW| <= 1.0%", rank_map={
        "blocks.0.attn.qkv": 4, "blocks.1.attn.qkv": 8}, trainable_before=1000,
        trainable_after=1100, trainable_pct=110.0, params_total=1000),
    EpochRecord(time=5.0, epoch=1, step=20, stage=2, val_loss=1.25, top1=55.5, top5=90.0,
                trainable_params=1100, peak_memory_bytes=123456789),
    EndRecord(time=6.0, step=100, epoch=5, stage=3, wall_s=42.5, trainable_params=100,
              params_total=1000, skipped_steps=1),
    StopRecord(time=7.0, step=50, signal="SIGUSR1"),
]


@pytest.mark.parametrize("rec", ONE_OF_EACH, ids=lambda r: r.kind)
def test_every_kind_round_trips_through_its_json_line(rec):
    line = json.dumps(rec.to_json())
    assert parse_record(json.loads(line)) == rec
    d = rec.to_json()
    # Today's line layout: kind and time first, then the fields as declared.
    assert list(d)[:2] == ["kind", "time"] and d["kind"] == rec.kind
    assert list(d)[2:] == list(rec.payload())


def test_non_finite_floats_are_strings_in_the_line_and_floats_again_when_read():
    rec = StepRecord(step=1, epoch=0, stage=1, loss=float("nan"), lr=1e-3,
                     images_per_s=float("inf"))
    d = rec.to_json()
    assert d["loss"] == "nan" and d["images_per_s"] == "inf"
    back = parse_record(json.loads(json.dumps(d)))
    assert math.isnan(back.loss) and back.images_per_s == math.inf
    # A string field that happens to read "nan" stays a string.
    stop = parse_record({"kind": "stop", "step": 1, "signal": "nan"})
    assert stop.signal == "nan"


def test_an_old_window_line_without_the_newer_fields_parses():
    old = {"kind": "window", "time": 1000.0, "window": 1, "step": 5, "epoch": 0, "stage": 1,
           "loss": 2.0, "dW": {}, "dL": None, "tau": 1.0, "zeta": 10.0,
           "modules": ["attn.qkv"], "norms": [[1.0, 1.1]]}
    w = parse_record(old)
    assert isinstance(w, WindowRecord)
    assert (w.du, w.base_norms, w.updates, w.energy_ranks, w.tau_update) == (None,) * 5
    assert w.criterion == "norm" and w.extra == {}
    start = parse_record({"kind": "start", "mode": "full", "world_size": 1, "global_batch": 8,
                          "steps_per_epoch": 4, "total_steps": 8, "window_steps": 5,
                          "params_total": 10, "trainable": 10, "stage": 1})
    assert start.resumed_from is None and start.resumed_step == 0


def test_fields_a_newer_writer_adds_are_kept_in_extra_and_written_back():
    d = {**ONE_OF_EACH[-1].to_json(), "grace_s": 30}
    rec = parse_record(d)
    assert rec.extra == {"grace_s": 30}
    assert rec.to_json() == d


def test_an_unknown_kind_or_a_missing_field_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown record kind 'checkpoint'"):
        parse_record({"kind": "checkpoint", "step": 3})
    with pytest.raises(ValueError, match="unknown record kind None"):
        parse_record({"step": 3})
    with pytest.raises(ValueError, match=r"'end' record lacks \['wall_s'\]"):
        parse_record({k: v for k, v in ONE_OF_EACH[5].to_json().items() if k != "wall_s"})


def test_read_records_in_order_by_kind_and_a_malformed_line_names_file_and_line(tmp_path):
    lines = [json.dumps(r.to_json()) for r in ONE_OF_EACH]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]))
    assert read_records(tmp_path) == ONE_OF_EACH
    assert read_records(tmp_path, "window") == [ONE_OF_EACH[2]]
    with pytest.raises(ValueError, match="unknown record kind 'windows'"):
        read_records(tmp_path, "windows")
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: "):
        read_records(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(lines[0] + '\n{"kind": "tick"}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: unknown record kind 'tick'"):
        read_records(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "nope")


def test_a_scaling_row_has_exactly_the_keys_and_is_checked():
    d = {"stage": 3, "scaling": "weak", "nodes": 2, "gpus": 8, "global_batch": 2048,
         "images_per_s": 4000.0, "images_per_s_per_gpu": 500.0, "step_time_s": 0.512,
         "allreduce_bytes_per_step": 4_000_000, "peak_memory_bytes": 2**30, "device": "A100"}
    row = ScalingRow.from_json(d)
    assert tuple(row.to_json()) == records.SCALING_ROW_KEYS == tuple(d)
    assert row.to_json() == d
    with pytest.raises(ValueError, match="step_time_s"):
        ScalingRow.from_json({k: v for k, v in d.items() if k != "step_time_s"})
    with pytest.raises(ValueError, match="stage must be 1 or 3"):
        ScalingRow.from_json({**d, "stage": 2})
    with pytest.raises(ValueError, match="gpus and images_per_s"):
        ScalingRow.from_json({**d, "gpus": 0})


def test_the_writer_writes_records_in_todays_layout_and_stamps_the_time(tmp_path):
    from prelora_hpc.metrics import MetricsWriter
    from run_helpers import read_metrics

    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    stop = StopRecord(step=50, signal="SIGTERM")
    w.record(stop)
    w.record(StopRecord(step=51, signal="SIGTERM"))
    w.record(ONE_OF_EACH[1])
    w.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert list(lines[0]) == list(lines[1]) == ["kind", "time", "step", "signal"]
    assert isinstance(lines[0]["time"], float) and stop.time is None
    got = read_records(tmp_path)
    assert got[0] == StopRecord(time=lines[0]["time"], step=50, signal="SIGTERM")
    assert got[2] == ONE_OF_EACH[1]  # a record with its time keeps it
    assert read_metrics(tmp_path, "stop") == lines[:2]
