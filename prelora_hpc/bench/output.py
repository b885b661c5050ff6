"""The bench's result for people: the plain-text table rank 0 prints, the
Markdown section docs/benchmarks.md quotes, ``--count-only``'s lines, and
the scaling rows ``prelora-report scaling`` reads.
"""

from __future__ import annotations

from typing import Any, Optional

from ..records import ScalingRow
from .cost import PROJECTION_NODES, ratio


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return _fmt_bytes(v)
    if kind == "s":
        return f"{v * 1e3:.1f} ms"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.1f}"


def format_table(r: dict[str, Any]) -> str:
    """The human-readable report (rank 0 prints it)."""
    s1, s3 = r.get("stage1"), r.get("stage3")
    lines = [
        f"prelora-bench {r['preset']}: {r['world_size']} rank(s) on {r['nodes']} node(s), "
        f"{r['device']}, {r['backend']}, {r['precision']}, ZeRO {r['zero_stage']}",
        f"model {r['model']['name']} (img {r['model']['img_size']}, width "
        f"{r['model']['embed_dim']}, depth {r['model']['depth']}"
        f"{', compiled' if r['model'].get('compile') else ''}); micro batch "
        f"{r['micro_batch_size']} per rank, global {r['global_batch']}; {r['steps']} timed steps "
        f"after {r['warmup_steps']} warm-up (median of the slowest rank)",
        f"rank map: {r['rank_map']['source']}, {r['rank_map']['layers']} layers, "
        f"rank: count {r['rank_map']['histogram']}",
        "",
        f"{'':34}{'stage 1':>16}{'stage 3':>16}{'3 / 1':>10}",
    ]
    rows = [("step time (median)", "step_time_s", "s", "step_time_ratio"),
            ("step time without all-reduce", "compute_time_s", "s", "compute_time_ratio"),
            ("first step (compile, warm-up)", "first_step_s", "s", None),
            ("images/s (all ranks)", "images_per_s", "f", None),
            ("trainable parameters", "trainable_params", "int", "trainable_fraction"),
            ("optimizer state (per rank)", "optimizer_state_bytes", "bytes", "optimizer_state_ratio"),
            ("gradient bytes all-reduced/step", "grad_bytes", "bytes", "grad_bytes_ratio"),
            ("all-reduce payload logged/step", "allreduce_bytes_per_step", "bytes",
             "allreduce_bytes_ratio"),
            ("peak memory (max over ranks)", "peak_memory_bytes", "bytes", "peak_memory_ratio")]
    for label, key, kind, ratio_key in rows:
        a = _fmt(s1.get(key), kind) if s1 else "-"
        b = _fmt(s3.get(key), kind) if s3 else "-"
        q = r.get(ratio_key) if ratio_key else None
        lines.append(f"{label:34}{a:>16}{b:>16}{(f'{q:.3f}' if q is not None else ''):>10}")
    if s1 and s3 and r.get("flop_ratio") is not None:
        lines.append(f"{'FLOPs per step (one rank)':34}{s1['checks']['flops_per_step']:>16.3g}"
                     f"{s3['checks']['flops_per_step']:>16.3g}{r['flop_ratio']:>10.3f}")
    fl = r.get("floor")
    if fl:
        over = r.get("stage3_over_floor")
        lines.append(f"floor (base frozen, no adapters; {fl['trainable_params']:,} trainable): "
                     f"step {_fmt(fl['step_time_s'], 's')}, without all-reduce "
                     f"{_fmt(fl['compute_time_s'], 's')}"
                     + (f"; stage 3 / floor {over:.3f} ({1e3 * r['stage3_above_floor_s']:+.1f} ms)"
                        if over is not None else ""))
    il = r.get("interleaved")
    if il:
        parts = [f"{c} {_fmt(il[f'{c}_step_time_s'], 's')}" for c in ("stage1", "stage3", "floor")
                 if f"{c}_step_time_s" in il]
        lines.append(f"interleaved ({il['rounds']} rounds, the configurations stepped in turn): "
                     + ", ".join(parts)
                     + "".join(f"; stage 3 / {o} {il[f'stage3_over_{o}']:.3f}"
                               for o in ("stage1", "floor") if il.get(f"stage3_over_{o}") is not None))
    if r.get("peer"):
        lines += _format_peer(r)
    if s1 and "bookkeeping" in s1:
        bk = s1["bookkeeping"]
        frac = bk["fraction_of_step_time"]
        per = (f"{bk['window_steps']} steps" if bk["window_steps"] else
               "an epoch (no step count: pass --window-steps for the share)")
        lines.append(f"convergence bookkeeping: {bk['per_window_s'] * 1e3:.2f} ms per window of "
                     f"{per} = " + (f"{100 * frac:.3f}% of step time" if frac is not None else "n/a"))
        ufrac = bk.get("update_fraction_of_step_time")
        lines.append(f"  of which update statistics (relative update, energy ranks): "
                     f"{bk['update_stats_s'] * 1e3:.2f} ms = "
                     + (f"{100 * ufrac:.3f}% of step time" if ufrac is not None else "n/a"))
    if s3 and "checks" in s3:
        lines.append("")
        lines.append("stage-3 checks:")
        for name, v in s3["checks"].items():
            if isinstance(v, dict) and "ok" in v:
                mark = {True: "ok  ", False: "FAIL", None: "n/a "}[v["ok"]]
                lines.append(f"  {mark} {name}: {v['detail']}")
        for s in (s1, s3):
            if s and s.get("checks", {}).get("dropout_kernels"):
                lines.append(f"  note: stage {s['stage']} step ran dropout kernels "
                             f"{s['checks']['dropout_kernels']} (the base model's, p = 0)")
    net = r["network"]
    lines.append("")
    lines.append(f"projection: {r['projection']['gpus_per_node']} GPUs/node, micro batch "
                 f"{r['projection']['micro_batch_per_gpu']} per GPU (weak scaling), network "
                 f"{net['bandwidth_gbps']:.1f} Gb/s ({net['bandwidth_source']}), latency "
                 f"{net['latency_s'] * 1e6:.1f} us/hop ({net['latency_source']}); ring all-reduce "
                 f"moves 2(N-1)/N x bytes per rank; overlap 0 (our ZeRO 0 engine reduces after "
                 f"the backward pass)")
    p = r["projection"]
    if "stage1" in p or "stage3" in p:
        lines.append(f"{'nodes':>6}{'GPUs':>7}" + "".join(
            f"{f'stage {k[-1]} img/s':>17}{'eff':>7}" for k in ("stage1", "stage3") if k in p))
        for i, n in enumerate(PROJECTION_NODES):
            line = f"{n:>6}{n * p['gpus_per_node']:>7}"
            for k in ("stage1", "stage3"):
                if k in p:
                    row = p[k][i]
                    line += f"{row['images_per_s']:>17.1f}{100 * row['efficiency']:>6.1f}%"
            lines.append(line)
    missing = [k for k in ("stage1", "stage3") if k in r and r[k]["compute_time_s"] is None]
    if missing:
        lines.append("no projection for " + ", ".join(missing) + ": ZeRO 1/2 cannot switch their "
                     "gradient reduction off, so the compute time is unknown on more than one "
                     "rank (run on 1 rank, or with deepspeed.zero_stage=0)")
    if r.get("projection_check"):
        m = net["measured"]
        lines.append("")
        lines.append(f"measured vs projected on these {r['world_size']} ranks (all-reduce "
                     f"{m['bandwidth_gbps']:.2f} Gb/s, {m['small_allreduce_s'] * 1e6:.0f} us for 4 B):")
        for k, c in r["projection_check"].items():
            if k.startswith("peer_"):
                lines.append(f"  stage {k[-1]}, DDP peer: measured {c['measured_step_s'] * 1e3:.1f} "
                             f"ms, compute {c['compute_s'] * 1e3:.1f} + all-reduce "
                             f"{c['projected_comm_s'] * 1e3:.1f}: hid "
                             f"{100 * c['hidden_fraction']:.0f}% of it behind the backward pass")
                continue
            lines.append(f"  stage {k[-1]}: measured {c['measured_step_s'] * 1e3:.1f} ms, projected "
                         f"{c['projected_step_s'] * 1e3:.1f} ms (compute {c['compute_s'] * 1e3:.1f} "
                         f"+ all-reduce {c['projected_comm_s'] * 1e3:.1f}, overlap 0), error "
                         f"{100 * c['error']:+.1f}%; hidden by the measured step "
                         f"{100 * c['hidden_fraction']:.0f}%")
    return "\n".join(lines)


def _format_peer(r: dict[str, Any]) -> list[str]:
    """The peer's rows: our stage beside the same stage under DDP."""
    peer = r["peer"]
    auto = next((v["autocast"] for k, v in peer.items() if isinstance(v, dict)), None)
    lines = ["", "peer: torch DDP + torch AdamW on the same model, batch and ranks"
                 + (f" (fp32 weights, autocast {auto})" if auto else "")
                 + "; stage 3's DDP reduces the trainable gradients only",
             f"{'':38}{'ours':>12}{'DDP':>12}{'ours / DDP':>12}"]
    for k in ("stage1", "stage3"):
        if k not in peer:
            continue
        ours, theirs = r[k], peer[k]
        for label, key, ratio_key in (("step time (median)", "step_time_s", f"{k}_over_peer"),
                                      ("step time without all-reduce", "compute_time_s",
                                       f"{k}_compute_over_peer"),
                                      ("peak memory", "peak_memory_bytes", None)):
            kind = "bytes" if key == "peak_memory_bytes" else "s"
            q = r.get(ratio_key) if ratio_key else ratio(ours[key], theirs[key])
            lines.append(f"{f'stage {k[-1]} {label}':38}{_fmt(ours[key], kind):>12}"
                         f"{_fmt(theirs[key], kind):>12}{(f'{q:.3f}' if q is not None else ''):>12}")
        il = theirs.get("interleaved")
        if il:
            lines.append(f"{f'stage {k[-1]} step, interleaved':38}"
                         f"{_fmt(il['ours_step_time_s'], 's'):>12}"
                         f"{_fmt(il['peer_step_time_s'], 's'):>12}{il['ratio']:>12.3f}")
    return lines


def format_markdown(r: dict[str, Any]) -> str:
    """The result as a Markdown section: what ran where, then one row per
    configuration (ours, the floor, the peer) with its ratios."""
    def ms(v: Optional[float]) -> str:
        return "-" if v is None else f"{v * 1e3:.1f} ms"

    def q(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.3f}"

    s1 = r.get("stage1")
    lines = [f"`{r['command']}`", "",
             f"{r['date']}, {r['device']}, {r['world_size']} rank(s) on {r['nodes']} node(s), "
             f"{r['backend']}, {r['precision']}, ZeRO {r['zero_stage']}, torch {r['torch']}; "
             f"{r['model']['name']} at {r['model']['img_size']} px"
             f"{' (model.compile)' if r['model'].get('compile') else ''}, micro batch "
             f"{r['micro_batch_size']} per rank; {r['steps']} timed steps after "
             f"{r['warmup_steps']} warm-up, median of the slowest rank.", "",
             "| configuration | step | without all-reduce | first step | images/s | trainable "
             "| peak memory | step / stage 1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("stage 1 (ours)", s1), ("stage 3 (ours)", r.get("stage3")),
            ("floor: stage 3 without adapters", r.get("floor"))]
    peer = r.get("peer") or {}
    rows += [(f"stage {k[-1]}, peer {peer['kind']}", peer.get(k)) for k in ("stage1", "stage3")
             if k in peer]
    for label, s in rows:
        if not s:
            continue
        rel = ratio(s["step_time_s"], s1["step_time_s"]) if s1 else None
        lines.append(f"| {label} | {ms(s['step_time_s'])} | {ms(s['compute_time_s'])} | "
                     f"{ms(s.get('first_step_s'))} | "
                     f"{s['images_per_s']:.1f} | {s['trainable_params']:,} | "
                     f"{_fmt_bytes(s['peak_memory_bytes'])} | {q(rel)} |")
    lines.append("")
    for label, key in (("stage 3 / stage 1", "step_time_ratio"),
                       ("stage 3 / floor", "stage3_over_floor"),
                       ("stage 3 / stage 1, steps interleaved", "step_time_ratio_interleaved"),
                       ("stage 3 / floor, steps interleaved", "stage3_over_floor_interleaved"),
                       ("stage 1 ours / peer", "stage1_over_peer"),
                       ("stage 3 ours / peer", "stage3_over_peer"),
                       ("stage 1 ours / peer, steps interleaved", "stage1_over_peer_interleaved"),
                       ("stage 3 ours / peer, steps interleaved", "stage3_over_peer_interleaved")):
        if r.get(key) is not None:
            lines.append(f"- {label}: **{r[key]:.3f}**")
    return "\n".join(lines) + "\n"


def format_count(c: dict[str, Any]) -> str:
    """``--count-only``'s lines: stage 1 and stage 3 trainable parameters and
    the gradients each all-reduces (``cost.count_only``'s result)."""
    lines = [f"{c['model']}: {c['stage1_trainable']:,} parameters trained in stage 1; "
             f"{c['layers_adapted']} adapted layers",
             f"  gradients all-reduced per step ({c['grad_element_bytes']} B each); ring all-reduce "
             f"time over {c['allreduce_gpus']} GPUs at {c['bandwidth_gbps']:g} Gb/s, bandwidth term only",
             f"  {'stage 1':33}: {_fmt_bytes(c['stage1_grad_bytes'])}, "
             f"{c['stage1_allreduce_s'] * 1e3:.1f} ms"]
    for label, key in (("representative rank map", "rank_map"), ("every layer at r_min", "all_r_min"),
                       ("every layer at r_max", "all_r_max")):
        v = c[key]
        lines.append(f"  stage 3, {label:24}: {v['stage3_trainable']:>12,} trainable "
                     f"({v['adapter_params']:,} adapter + {v['kept_params']:,} kept) = "
                     f"{100 * v['trainable_fraction']:.2f}% of stage 1; {_fmt_bytes(v['grad_bytes'])}, "
                     f"{v['allreduce_s'] * 1e3:.1f} ms")
    return "\n".join(lines)


def scaling_row(result: dict[str, Any], stage: int, scaling: str) -> dict[str, Any]:
    """One row of ``prelora-report scaling`` (``records.ScalingRow``, keys in
    ``records.SCALING_ROW_KEYS`` order) for ``stage`` of a bench result."""
    s = result[f"stage{stage}"]
    g = int(result["world_size"])
    ips = result["global_batch"] / s["step_time_s"]
    return ScalingRow(stage=stage, scaling=scaling, nodes=int(result["nodes"]), gpus=g,
                      global_batch=int(result["global_batch"]), images_per_s=float(ips),
                      images_per_s_per_gpu=float(ips / g), step_time_s=float(s["step_time_s"]),
                      allreduce_bytes_per_step=int(s["allreduce_bytes_per_step"]),
                      peak_memory_bytes=int(s["peak_memory_bytes"]),
                      device=str(result["device"])).to_json()
