"""Window statistics and the algorithms that judge them: pure numbers.

Algorithm 1 (``partial_convergence``), Algorithm 2 (``assign_ranks``), the
update test (``update_convergence``) and ``energy_rank`` are pure functions,
exactly as docs/architecture.md states them. ``WindowHistory`` keeps the
last ``k`` windows; ``NormTracker`` reads per-layer norms of the base and of
the effective weights from a timm ViT; ``UpdateTracker`` measures this
rank's share of the per-window relative updates. Nothing here
communicates: the trainer all-reduces, rank 0's ``SwitchPolicy`` decides,
and the decision is broadcast.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from typing import Callable

import numpy as np
import torch
import torch.nn as nn


def percent_change(prev: float, cur: float, what: str) -> float:
    """Percent change ``(cur - prev) / prev * 100`` between two windows.

    ``what`` names the quantity in the error raised for a non-finite value or
    a previous value <= 0 (the change is undefined there).
    """
    if not math.isfinite(prev) or not math.isfinite(cur):
        raise ValueError(f"{what}: values must be finite, got {prev!r} -> {cur!r}")
    if prev <= 0:
        raise ValueError(f"{what}: previous value must be > 0, got {prev!r}")
    # Multiplying first rounds once: 100 -> 107 is exactly 7%, so a change equal
    # to the threshold passes (dividing first gives 7.000000000000001).
    return 100.0 * (cur - prev) / prev


def _check_finite(values: list[float], name: str) -> None:
    for t, x in enumerate(values):
        if not math.isfinite(x):
            raise ValueError(f"{name}[{t}] is not finite: {x!r}")


def window_changes(
    weight_norms: dict[str, list[float]], losses: list[float]
) -> tuple[dict[str, list[float]], list[float]]:
    """Percent changes between consecutive windows, the numbers Algorithm 1 tests.

    ``weight_norms[a]`` is module ``a``'s layer-averaged norm per window and
    ``losses`` the loss per window, both oldest first and of equal length
    k >= 2. Returns (dW per module, dL), each of length k - 1, in percent.
    """
    if not weight_norms:
        raise ValueError("weight_norms is empty: no module to test")
    if len(losses) < 2:
        raise ValueError(f"losses: need at least 2 windows, got {len(losses)}")
    _check_finite(losses, "losses")
    d_loss = [percent_change(losses[t - 1], losses[t], f"losses window {t - 1}->{t}")
              for t in range(1, len(losses))]
    d_norm = {}
    for a, norms in weight_norms.items():
        name = f"weight_norms[{a!r}]"
        if len(norms) != len(losses):
            raise ValueError(f"{name} has {len(norms)} windows but losses has {len(losses)}")
        _check_finite(norms, name)
        d_norm[a] = [percent_change(norms[t - 1], norms[t], f"{name} window {t - 1}->{t}")
                     for t in range(1, len(norms))]
    return d_norm, d_loss


def partial_convergence(
    weight_norms: dict[str, list[float]], losses: list[float], tau: float, zeta: float
) -> bool:
    """Algorithm 1: True when no module's norm moved more than ``tau`` percent
    and the loss no more than ``zeta`` percent between any two consecutive
    windows given (a change equal to the threshold passes).

    Inputs as in ``window_changes``; every window given is used.
    """
    for name, x in (("tau", tau), ("zeta", zeta)):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {x!r}")
    d_norm, d_loss = window_changes(weight_norms, losses)
    if any(abs(d) > zeta for d in d_loss):
        return False
    return all(abs(d) <= tau for changes in d_norm.values() for d in changes)


def _log2_of_power_of_two(r: int, name: str) -> int:
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r <= 0 or r & (r - 1):
        raise ValueError(f"{name} must be a power of two, got {r!r}")
    return int(r).bit_length() - 1


def assign_ranks(changes: dict[str, list[float]], r_min: int, r_max: int) -> dict[str, list[int]]:
    """Algorithm 2: a LoRA rank per module and layer from the layers' last
    weight-norm changes (percent; the sign is ignored).

    Per module the magnitudes are min-max normalised to v in [0, 1] (all equal:
    v = 0) and layer l gets ``R[ceil(v * |R|) - 1]`` (``R[0]`` when v = 0),
    where R = [r_min, 2 r_min, ..., r_max]. Returns ranks in the layers' order.
    """
    lo_p, hi_p = _log2_of_power_of_two(r_min, "r_min"), _log2_of_power_of_two(r_max, "r_max")
    if r_min > r_max:
        raise ValueError(f"r_min={r_min} > r_max={r_max}")
    if not changes:
        raise ValueError("changes is empty: no module to assign ranks to")
    ranks_set = [2**p for p in range(lo_p, hi_p + 1)]
    n = len(ranks_set)
    out = {}
    for a, layer_changes in changes.items():
        if len(layer_changes) == 0:
            raise ValueError(f"changes[{a!r}] has no layers")
        _check_finite(layer_changes, f"changes[{a!r}]")
        mags = [abs(x) for x in layer_changes]
        lo, hi = min(mags), max(mags)
        ranks = []
        for x in mags:
            v = (x - lo) / (hi - lo) if hi > lo else 0.0
            i = math.ceil(v * n) - 1 if v != 0 else 0
            # v * n can round across an integer; the index must stay in R.
            ranks.append(ranks_set[min(max(i, 0), n - 1)])
        out[a] = ranks
    return out


class LayerGrid:
    """The tracked layers: ``modules`` in each of ``num_layers`` blocks.
    Layer ``l`` of module ``a`` is named ``f"{block_prefix}.{l}.{a}"``, e.g.
    ``blocks.3.attn.qkv``; statistics are laid out [module, layer]."""

    def __init__(self, modules: list[str], num_layers: int, block_prefix: str = "blocks"):
        if not modules or len(set(modules)) != len(modules):
            raise ValueError(f"modules must be a non-empty list without repeats, got {modules!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.module_names = list(modules)
        self.num_layers = num_layers
        self.block_prefix = block_prefix

    def layer_names(self) -> list[str]:
        """Every tracked layer's module path, module by module, block by block."""
        return [self.layer_name(m, l) for m in self.module_names for l in range(self.num_layers)]

    def layer_name(self, module: str, layer: int) -> str:
        """Full name of layer ``layer`` of ``module``, e.g. ``blocks.3.attn.qkv``."""
        return f"{self.block_prefix}.{layer}.{module}"


class WindowHistory(LayerGrid):
    """The last ``k`` windows' per-module, per-layer weight norms and losses.

    Pure bookkeeping on numbers (no model, no collectives): the trainer and
    the what-if replay keep their history in one of these, through the same
    ``SwitchPolicy``.
    """

    def __init__(self, modules: list[str], num_layers: int, k: int, block_prefix: str = "blocks"):
        super().__init__(modules, num_layers, block_prefix)
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an integer >= 2, got {k!r}")
        self.k = k
        self._norms: deque[list[list[float]]] = deque(maxlen=k)
        self._losses: deque[float] = deque(maxlen=k)
        self.windows_seen = 0

    def _check_window(self, norms, loss) -> tuple[list[list[float]], float]:
        arr = np.asarray(norms.detach().cpu() if isinstance(norms, torch.Tensor) else norms,
                         dtype=np.float64)
        shape = (len(self.module_names), self.num_layers)
        if arr.shape != shape:
            raise ValueError(f"norms: expected shape {shape} (modules, layers), got {arr.shape}")
        for (i, layer), x in np.ndenumerate(arr):
            if not math.isfinite(x) or x <= 0:
                name = self.layer_name(self.module_names[i], layer)
                raise ValueError(f"norm of {name} must be finite and > 0, got {x!r}")
        loss = float(loss)
        if not math.isfinite(loss) or loss <= 0:
            raise ValueError(f"loss must be finite and > 0, got {loss!r}")
        return arr.tolist(), loss

    def record(self, norms: torch.Tensor | np.ndarray, loss: float) -> None:
        """Append one window: global Frobenius norms [num_modules, num_layers]
        (sqrt of the all-reduced sum of squares) and the window's mean loss."""
        norms, loss = self._check_window(norms, loss)
        self._norms.append(norms)
        self._losses.append(loss)
        self.windows_seen += 1

    @property
    def ready(self) -> bool:
        """At least ``k`` windows recorded: Algorithm 1 can run."""
        return len(self._losses) == self.k

    def history(self) -> tuple[dict[str, list[float]], list[float]]:
        """(layer-averaged norm per module per kept window, kept losses), oldest
        first: the inputs of ``partial_convergence``."""
        avg = {a: [math.fsum(w[i]) / self.num_layers for w in self._norms]
               for i, a in enumerate(self.module_names)}
        return avg, list(self._losses)

    def layer_changes(self) -> dict[str, list[float]]:
        """Signed percent change of each layer's norm between the last two
        windows, per module: the input of ``assign_ranks``."""
        if len(self._norms) < 2:
            raise ValueError(f"layer_changes needs 2 recorded windows, have {len(self._norms)}")
        prev, cur = self._norms[-2], self._norms[-1]
        return {a: [percent_change(prev[i][j], cur[i][j], self.layer_name(a, j))
                    for j in range(self.num_layers)]
                for i, a in enumerate(self.module_names)}

    def rank_map(self, ranks: dict[str, list[int]]) -> dict[str, int]:
        """Flatten ``assign_ranks``' output to full layer names, e.g.
        ``{"blocks.0.attn.qkv": 8, ...}``."""
        if set(ranks) != set(self.module_names):
            raise ValueError(f"ranks covers {sorted(ranks)}, tracked are {self.module_names}")
        out = {}
        for a in self.module_names:
            if len(ranks[a]) != self.num_layers:
                raise ValueError(
                    f"ranks[{a!r}] has {len(ranks[a])} layers, the model {self.num_layers}")
            out.update({self.layer_name(a, j): int(r) for j, r in enumerate(ranks[a])})
        return out

    def state_dict(self) -> dict:
        """The kept history as plain lists and floats (JSON-serialisable)."""
        return {"modules": list(self.module_names), "num_layers": self.num_layers,
                "windows_seen": self.windows_seen, "losses": list(self._losses),
                "norms": [[list(row) for row in w] for w in self._norms]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a history saved by ``state_dict`` (keeps the last ``k`` windows)."""
        if state["modules"] != self.module_names or state["num_layers"] != self.num_layers:
            raise ValueError(
                f"saved norm history tracks {state['modules']} over {state['num_layers']} layers, "
                f"this model {self.module_names} over {self.num_layers}")
        if len(state["norms"]) != len(state["losses"]):
            raise ValueError("saved norm history: norms and losses differ in length")
        windows = [self._check_window(n, loss) for n, loss in zip(state["norms"], state["losses"])]
        self._norms = deque((n for n, _ in windows), maxlen=self.k)
        self._losses = deque((loss for _, loss in windows), maxlen=self.k)
        self.windows_seen = int(state["windows_seen"])


class NormTracker(LayerGrid):
    """Reads per-layer norms from a timm ViT's tracked linears.

    A LoRA wrapper keeping the original as ``.base_layer`` is tracked through
    its base weight (``local_sumsq``) or through its effective weight
    ``W0 + scaling * B @ A`` (``local_effective_sumsq``).
    """

    def __init__(self, model: nn.Module, modules: list[str], block_prefix: str = "blocks",
                 local_part: Callable[[torch.Tensor], torch.Tensor] = lambda w: w):
        """``local_part``: the part of a weight this process holds (its
        partition where an engine partitions weights over ranks; the
        identity otherwise), supplied by the caller that knows the engine."""
        self.local_part = local_part
        try:
            blocks = model.get_submodule(block_prefix)
        except AttributeError:
            raise ValueError(f"model has no {block_prefix!r} (the transformer blocks)") from None
        super().__init__(modules, len(blocks), block_prefix)
        self._model = model
        self._weights(model)  # fail now, not at the first window end

    def _layers(self, model: nn.Module) -> list[list[nn.Module]]:
        rows = []
        for a in self.module_names:
            row = []
            for layer in range(self.num_layers):
                name = self.layer_name(a, layer)
                try:
                    row.append(model.get_submodule(name))
                except AttributeError:
                    raise ValueError(f"tracked module {a!r} is missing: no {name!r}") from None
            rows.append(row)
        return rows

    def _weights(self, model: nn.Module) -> list[list[torch.Tensor]]:
        rows = []
        for a, mods in zip(self.module_names, self._layers(model)):
            row = []
            for layer, mod in enumerate(mods):
                mod = getattr(mod, "base_layer", mod)
                if not isinstance(getattr(mod, "weight", None), torch.Tensor):
                    raise ValueError(f"tracked module {a!r}: {self.layer_name(a, layer)!r} "
                                     "has no weight tensor")
                row.append(mod.weight)
            rows.append(row)
        return rows

    @property
    def sharded(self) -> bool:
        """True if any tracked weight is partitioned over ranks (``local_part``
        is not the whole): the caller must SUM-all-reduce ``local_sumsq()``
        (a replicated one is already global)."""
        return any(self.local_part(w) is not w for row in self._weights(self._model) for w in row)

    @torch.no_grad()
    def local_sumsq(self, model: nn.Module | None = None) -> torch.Tensor:
        """Sum of squares of each tracked weight as this process holds it
        (``local_part``), float64 CPU, [num_modules, num_layers].
        ``model`` defaults to the one given at construction."""
        rows = self._weights(self._model if model is None else model)
        flat = []
        for row in rows:
            for w in row:
                flat.append(self.local_part(w).detach().float().pow(2).sum())
        # One stack and one copy: a single device sync per window end.
        return torch.stack(flat).to("cpu", torch.float64).reshape(len(rows), self.num_layers)


    @torch.no_grad()
    def local_effective_sumsq(self, model: nn.Module | None = None) -> torch.Tensor:
        """``||W0 + scaling * B @ A||_F^2`` of each tracked layer, float64 CPU,
        [num_modules, num_layers]; equals ``local_sumsq`` where no adapter is
        injected (stage 1). Replicated weights only (not under ZeRO-3).

        ``B @ A`` is never formed: ``||W0||^2 + 2 s <W0, B A> + s^2 ||B A||^2``
        with ``<W0, B A> = sum((B^T W0) * A)`` ([r, in]) and
        ``||B A||^2 = sum((B^T B) * (A A^T))`` ([r, r]), so a window end costs
        one [r, out] x [out, in] product per layer and no dense copy.
        """
        flat = []
        for row in self._layers(self._model if model is None else model):
            for mod in row:
                w = getattr(mod, "base_layer", mod).weight.detach().float()
                sq = w.pow(2).sum().double()
                if hasattr(mod, "lora_A") and not mod.merged:
                    a = mod.lora_A.weight.detach().float()
                    b = mod.lora_B.weight.detach().float()
                    cross = (b.t() @ w).mul_(a).sum().double()
                    gram = ((b.t() @ b) * (a @ a.t())).sum().double()
                    sq = sq + 2.0 * mod.scaling * cross + mod.scaling ** 2 * gram
                flat.append(sq)
        return torch.stack(flat).to("cpu", torch.float64).reshape(len(self.module_names),
                                                                   self.num_layers)

    def effective_weight(self, module: str, layer: int, model: nn.Module | None = None
                         ) -> torch.Tensor:
        """The effective weight ``W0 + scaling * B @ A`` of one tracked layer
        (a new dense tensor, [out, in], float32): for the update statistics,
        formed for one layer at a time and dropped after use."""
        mod = (self._model if model is None else model).get_submodule(self.layer_name(module, layer))
        w = getattr(mod, "base_layer", mod).weight.detach().float()
        if hasattr(mod, "lora_A") and not mod.merged:
            return torch.addmm(w, mod.lora_B.weight.detach().float(),
                               mod.lora_A.weight.detach().float(), alpha=mod.scaling)
        # .float() of a float32 weight is the weight itself, which the
        # optimizer updates in place: the reference must be a copy.
        return w.clone()


def relative_update(prev: torch.Tensor, cur: torch.Tensor) -> float:
    """``||cur - prev||_F / ||prev||_F * 100``: how far a weight moved over a
    window, in percent of its size (0 for a weight that did not move)."""
    denom = float(prev.double().norm())
    if not math.isfinite(denom) or denom <= 0:
        raise ValueError(f"relative_update: previous weight norm must be finite and > 0, "
                         f"got {denom!r}")
    return 100.0 * float((cur.double() - prev.double()).norm()) / denom


def energy_rank(singular_values: list[float] | np.ndarray, share: float, r_min: int,
                r_max: int, total_energy: float | None = None) -> int:
    """The smallest power of two in [r_min, r_max] whose top singular values
    hold at least ``share`` of the energy (sum of squares) of an update;
    ``r_max`` when none does. An update of zero energy gets ``r_min``.

    ``total_energy``: the update's whole energy (its squared Frobenius norm)
    when ``singular_values`` holds only the top ones; default their sum."""
    lo_p, hi_p = _log2_of_power_of_two(r_min, "r_min"), _log2_of_power_of_two(r_max, "r_max")
    if r_min > r_max:
        raise ValueError(f"r_min={r_min} > r_max={r_max}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share!r}")
    sq = np.sort(np.square(np.asarray(singular_values, dtype=np.float64)))[::-1]
    if not np.all(np.isfinite(sq)):
        raise ValueError("singular values must be finite")
    total = float(sq.sum()) if total_energy is None else float(total_energy)
    if total <= 0:
        return r_min
    cum = np.cumsum(sq) / total
    for p in range(lo_p, hi_p + 1):
        r = 2**p
        # Float rounding of a cumulative sum that should reach 1 exactly.
        if cum[min(r, len(cum)) - 1] >= share - 1e-12:
            return r
    return r_max


def top_singular_values(d: torch.Tensor, q: int, generator: torch.Generator,
                        power_iters: int = 2) -> torch.Tensor:
    """The top ``q`` singular values of ``d`` [m, n] (float32), by a randomized
    range finder with ``power_iters`` power iterations (Halko et al.): a few
    [m, n] x [n, q] products instead of a full SVD, slightly low if anything,
    so an energy rank from them errs towards the larger rank. Exact
    (``svdvals``) when ``q`` reaches the smaller dimension. ``generator``
    draws the projection: the run's own random streams stay untouched."""
    m, n = d.shape
    if q >= min(m, n):
        return torch.linalg.svdvals(d)
    g = torch.randn(n, q, generator=generator, dtype=d.dtype, device="cpu").to(d.device)
    y, _ = torch.linalg.qr(d @ g)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(d.t() @ y)
        y, _ = torch.linalg.qr(d @ z)
    return torch.linalg.svdvals(y.t() @ d)


def update_convergence(updates: dict[str, list[float]], losses: list[float],
                       tau_update: float, zeta: float) -> bool:
    """The update test: True when every module's layer-averaged relative
    update (percent per window, ``relative_update``) stayed at or below
    ``tau_update`` over the windows given, and the loss changed by no more
    than ``zeta`` percent between any two consecutive windows (as in
    Algorithm 1).

    ``updates[a]``: module ``a``'s mean relative update at each of the last
    k - 1 windows (each against the window before); ``losses``: the last k
    windows' losses, oldest first.
    """
    for name, x in (("tau_update", tau_update), ("zeta", zeta)):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {x!r}")
    if not updates:
        raise ValueError("updates is empty: no module to test")
    if len(losses) < 2:
        raise ValueError(f"losses: need at least 2 windows, got {len(losses)}")
    _check_finite(losses, "losses")
    for a, vals in updates.items():
        if len(vals) != len(losses) - 1:
            raise ValueError(f"updates[{a!r}] has {len(vals)} windows, expected "
                             f"{len(losses) - 1} (one fewer than losses)")
        _check_finite(vals, f"updates[{a!r}]")
    d_loss = [percent_change(losses[t - 1], losses[t], f"losses window {t - 1}->{t}")
              for t in range(1, len(losses))]
    if any(abs(d) > zeta for d in d_loss):
        return False
    return all(u <= tau_update for vals in updates.values() for u in vals)


class UpdateTracker:
    """How far each tracked layer's effective weight moved over the last
    window: the statistics of the update criterion and of energy ranks.

    Layers are split over ranks (layer ``j`` of the flattened
    [modules x layers] grid belongs to rank ``j % world_size``); each rank
    keeps a copy of its own layers' weights from the previous window end
    only, so the memory is about one model's tracked weights divided by the
    world size. ``local_stats`` fills this rank's entries and leaves zeros
    elsewhere: a SUM all-reduce by the caller assembles the whole grid.
    Nothing here communicates.
    """

    def __init__(self, norms: NormTracker, rank: int, world_size: int,
                 energy: float | None = None, r_min: int = 8, r_max: int = 64):
        self.norms = norms
        self.energy = energy
        self.r_min, self.r_max = r_min, r_max
        m, n = len(norms.module_names), norms.num_layers
        self.owned = [(i, l) for i in range(m) for l in range(n) if (i * n + l) % world_size == rank]
        self._prev: dict[tuple[int, int], torch.Tensor] = {}
        self._gen = torch.Generator()

    @torch.no_grad()
    def local_stats(self, model: nn.Module | None = None) -> torch.Tensor:
        """[3, num_modules, num_layers] float64 CPU: relative update in percent
        (``relative_update`` of the effective weight against the previous
        window end), energy rank (0 when ``energy`` is None), and 1 where this
        rank measured the layer (0 at the first window: no previous copy).
        Keeps the current weights as the next window's reference."""
        out = torch.zeros(3, len(self.norms.module_names), self.norms.num_layers,
                          dtype=torch.float64)
        for i, l in self.owned:
            cur = self.norms.effective_weight(self.norms.module_names[i], l, model)
            prev = self._prev.get((i, l))
            if prev is not None:
                prev = prev.to(cur.device)
                out[0, i, l] = relative_update(prev, cur)
                if self.energy is not None:
                    d = cur - prev
                    # Seeded by the layer alone: the same projection at every
                    # window, so a resumed run measures what an uninterrupted one does.
                    self._gen.manual_seed(i * self.norms.num_layers + l)
                    # r_max + 8: oversampling keeps the top r_max values accurate.
                    s = top_singular_values(d, self.r_max + 8, self._gen).cpu().numpy()
                    out[1, i, l] = energy_rank(s, self.energy, self.r_min, self.r_max,
                                               float(d.double().pow(2).sum()))
                out[2, i, l] = 1.0
            self._prev[(i, l)] = cur
        return out

    def state_dict(self) -> dict:
        """This rank's reference copies (CPU tensors by ``"module_index,layer"``),
        for a per-rank checkpoint file: a resume then measures the next window
        against the same weights as an uninterrupted run."""
        return {f"{i},{l}": w.detach().cpu() for (i, l), w in self._prev.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s copies (moved to the weights' device at
        their first use); copies of layers this rank does not own are an error (another world
        size splits the layers differently: pass an empty dict instead)."""
        prev = {}
        for key, w in state.items():
            i, l = (int(x) for x in key.split(","))
            if (i, l) not in self.owned:
                raise ValueError(f"update statistics: layer {key} belongs to another rank")
            prev[(i, l)] = w
        self._prev = prev
