"""Router: a budget -> a nested architecture, learned end to end with the distillation loss.

For every elastic axis (a width field of SubArch: hidden, ffn, mamba_heads_per_group, ...; and, opt-in,
"depth": how many depth units to keep, dropped in `ecfg.depth_order`, which sets SubArch.layers):

    one-hot(budget) [n_budgets] -> Linear -> LeakyReLU -> Linear -> logits [n_choices]   (largest width first)

`sample` draws a Gumbel-Softmax choice per axis (hard: one-hot values with the soft gradient, straight
through); `subarch` reads the chosen widths; `cost` is the differentiable expected cost of the choice.

How `cost` is computed (exact at one-hots, and the exact expectation for soft weights). Every cost nestlm
counts (parameters, active parameters, memory) is a sum over blocks plus an embedding/norm/head term, and
each block of kind K depends only on a few axes (attention: hidden and heads; Mamba: hidden and Mamba heads;
MLP: hidden and ffn; MoE: hidden, experts, moe_ffn and shared_ffn; embeddings: hidden). So, per kind, we
tabulate the cost of ONE block on the small grid of its own axes' choices, by calling the real counter
(`count_params` / `count_active_params` / `count_memory`) on one- and two-block configs and subtracting.
The expected cost is then  base·w_hidden + Σ_K n_K · contract(grid_K, w_a for a in axes(K)),  a multilinear
polynomial in the per-axis weights: at one-hot weights it is exactly the counter's value for that SubArch
(a test pins this), and for soft weights it is the expected cost under independent per-axis choices.
With depth as an axis, the number of blocks of kind K depends on the depth choice d (n_K[d]: blocks of K
among those kept), so n_K becomes (w_depth · n_K): one more leading dimension of each block kind's table,
n_K[d] · grid_K, contracted like the others (the cost stays multilinear, exact at one-hots).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.arch import SubArch, count_active_params, count_memory, count_params, depth_units
from nestlm.elastic.config import DEPTH, ElasticConfig
from nestlm.errors import ConfigError
from nestlm.model.config import ModelConfig

# the axes each block kind's cost depends on ("" = embeddings, final norm and lm_head)
KIND_AXES = {
    "": ("hidden",),
    "*": ("hidden", "attn_heads_per_group"),
    "-": ("hidden", "ffn"),
    "M": ("hidden", "mamba_heads_per_group"),
    "E": ("hidden", "experts", "moe_ffn", "shared_ffn"),
}


def cost_fn(metric: str, memory_seq_len: int = 4096):
    """The counter behind a metric: (cfg, sub) -> number."""
    if metric == "params":
        return count_params
    if metric == "active":
        return count_active_params
    return lambda cfg, sub=None: count_memory(cfg, sub, seq_len=memory_seq_len)["total"]


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, ecfg: ElasticConfig):
        super().__init__()
        self.cfg, self.ecfg = cfg, ecfg
        self.choices = ecfg.resolve_choices(cfg)  # {axis: [widths (depth: unit counts), largest first]}
        self.axes = list(self.choices)
        self.units = depth_units(cfg)  # [[block indices]] dropped together
        self.depth_order = self._depth_order(ecfg)  # unit indices, least important first; None without depth
        self.budgets = list(ecfg.budgets)
        nb, hd, na = len(self.budgets), ecfg.router_hidden, len(self.axes)
        n_max = max((len(ch) for ch in self.choices.values()), default=1)
        # One small MLP per axis, one-hot(budget) [nb] -> Linear -> LeakyReLU -> Linear -> logits [n_choices],
        # with the axes' weights stacked so that all of them run in the same few ops (a step's router cost is
        # op overhead, not arithmetic). Axis a owns w1[a] [hd, nb], b1[a], and the first n_choices(a) rows of
        # w2[a] [n_max, hd] and b2[a]; the rows past them are padding, masked out of every softmax.
        self.w1 = nn.Parameter(torch.empty(na, hd, nb))
        self.b1 = nn.Parameter(torch.empty(na, hd))
        self.w2 = nn.Parameter(torch.empty(na, n_max, hd))
        self.b2 = nn.Parameter(torch.empty(na, n_max))
        n = torch.tensor([len(ch) for ch in self.choices.values()], dtype=torch.long)
        self.register_buffer("valid", torch.arange(n_max)[None, :] < n[:, None], persistent=False)  # [na, n_max]
        self.reset_parameters()
        self.count = cost_fn(ecfg.metric, ecfg.memory_seq_len)
        self.full_cost = float(self.count(cfg))
        self._build_cost_tables()

    def _depth_order(self, ecfg: ElasticConfig) -> list[int] | None:
        if DEPTH not in self.choices:
            return None
        if ecfg.depth_order is None:  # (resolve_choices checked a given order against the model's units)
            raise ConfigError("ElasticConfig: the depth axis needs depth_order (the depth units, least important "
                              "first); elastify scores it on the calibration batches, and an elastic "
                              "checkpoint's manifest keeps it in its `elastic` section")
        return list(ecfg.depth_order)

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per axis: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for t, fan_in in ((self.w1, self.w1.shape[-1]), (self.b1, self.w1.shape[-1]),
                          (self.w2, self.w2.shape[-1]), (self.b2, self.w2.shape[-1])):
            nn.init.uniform_(t, -fan_in ** -0.5, fan_in ** -0.5)

    # ------------------------------------------------------------------ logits and sampling
    def onehot(self, budget_idx: int) -> torch.Tensor:
        return F.one_hot(torch.tensor(budget_idx, device=self.w1.device), len(self.budgets)).float()

    def table(self, budget_in: torch.Tensor) -> torch.Tensor:
        """budget_in: [n_budgets] (a one-hot, or a blend for interpolation) -> logits [n_axes, n_max], -inf
        in the padding.

        Logits are bounded to (-1, 1) (softsign or tanh), so that the schedules (logit scale 1 -> 10, tau 1 ->
        0.05), not the optimizer, decide how peaked the choice is: unbounded logits saturate the softmax
        within a few steps, after which the cost gradient vanishes and the router locks on an early guess."""
        bound = F.softsign if self.ecfg.router_bound == "softsign" else torch.tanh  # softsign saturates slowly
        h = F.leaky_relu(torch.einsum("ahn,n->ah", self.w1, budget_in) + self.b1)  # [na, hd]
        out = bound(torch.einsum("ach,ah->ac", self.w2, h) + self.b2)  # [na, n_max]
        return out.masked_fill(~self.valid, -torch.inf)

    def split(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """[n_axes, n_max] -> {axis: its first n_choices entries}."""
        return {ax: t[a, : len(ch)] for a, (ax, ch) in enumerate(self.choices.items())}

    def logits(self, budget_in: torch.Tensor) -> dict[str, torch.Tensor]:
        """budget_in: [n_budgets] -> {axis: bounded logits [n_choices]} (see `table`)."""
        return self.split(self.table(budget_in))

    def pinned(self, budget_idx: int) -> bool:
        return self.budgets[budget_idx] == 1.0

    def full_weights(self) -> dict[str, torch.Tensor]:
        dev = self.w1.device
        return {ax: F.one_hot(torch.tensor(0, device=dev), len(ch)).float() for ax, ch in self.choices.items()}

    def budget_logits(self, budget_idx: int) -> torch.Tensor:
        """The logits table [n_axes, n_max] of a trained budget. A training step evaluates it once and hands
        it to `sample` and `probs` (`logits=`): one router forward and backward per step, not one per use."""
        return self.table(self.onehot(budget_idx))

    def sample(self, budget_idx: int, tau: float = 1.0, scale: float = 1.0, hard: bool = True,
               generator: torch.Generator | None = None, logits: torch.Tensor | None = None,
               tol: float | None = None) -> dict[str, torch.Tensor]:
        """Per-axis Gumbel-Softmax weights [n_choices]. hard: one-hot values, soft gradients (straight
        through). The full budget (1.0) is pinned: constant one-hots on the full width, no gradient.
        logits: this budget's `budget_logits`, when the caller already has them. tol (hard only): the one-hot
        is the best-scoring combination under the same perturbed logits among those whose cost lies within
        `tol` of the budget (the exact cost table), instead of each axis's own argmax: training then samples
        only architectures that land, and at the end of the schedules it samples what `decode` exports."""
        if self.pinned(budget_idx):
            return self.full_weights()
        lg = self.budget_logits(budget_idx) if logits is None else logits  # [na, n_max]
        u = torch.rand(lg.shape, generator=generator, device=lg.device).clamp_(1e-10, 1 - 1e-10)
        gumbel = -torch.log(-torch.log(u))
        y = torch.softmax((lg * scale + gumbel) / tau, dim=-1)  # the padding's -inf gets probability 0
        if hard:  # value: the sampled one-hot; gradient: the noise-free softmax (see the class doc)
            p = torch.softmax(lg * (scale / tau), dim=-1)
            idx = y.argmax(-1) if tol is None else self._within(lg * scale + gumbel, self.budgets[budget_idx], tol)
            y = F.one_hot(idx, y.shape[-1]).to(y.dtype) - p.detach() + p
        return self.split(y)

    def _within(self, score: torch.Tensor, target: float, tol: float) -> torch.Tensor:
        """The hard sample of `sample(tol=...)`, the noisy counterpart of `decode`: `_best_landing` on the
        perturbed logits `score` [na, n_max]."""
        with torch.no_grad():
            return self._best_landing(list(self.split(score.double()).values()), target, tol).to(score.device)

    def probs(self, budget_idx: int, tau: float = 1.0, scale: float = 1.0,
              logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Noise-free choice probabilities softmax(logits * scale / tau) per axis: the router loss is taken on
        the expected cost under these (smooth, so the router settles on the budget instead of oscillating
        between the corners a sampled cost's sign-like gradient pushes it to). logits: as in `sample`."""
        if self.pinned(budget_idx):
            return self.full_weights()
        lg = self.budget_logits(budget_idx) if logits is None else logits
        return self.split(torch.softmax(lg * (scale / tau), dim=-1))

    def greedy(self, budget_idx: int) -> dict[str, torch.Tensor]:
        """One-hot weights at each axis's argmax (what inference uses)."""
        if self.pinned(budget_idx):
            return self.full_weights()
        with torch.no_grad():
            lg = self.logits(self.onehot(budget_idx))
        return {ax: F.one_hot(v.argmax(), v.shape[-1]).float() for ax, v in lg.items()}

    def decode(self, budget_idx: int, tol: float | None = None) -> dict[str, torch.Tensor]:
        """The architecture this budget gets at inference: the most probable combination of choices (under the
        end-of-training sharpness scale_end / tau_end) among those whose cost lies within `tol` (relative) of
        the budget. When the per-axis argmax (`greedy`) lands, that is it; when it misses, this is the
        router's next most likely architecture that does land. With no combination within `tol`, the one
        closest to the budget. tol=None: plain `greedy`."""
        if self.pinned(budget_idx) or tol is None:
            return self.greedy(budget_idx)
        with torch.no_grad():
            return self._most_probable(self.logits(self.onehot(budget_idx)), self.budgets[budget_idx], tol)

    def _most_probable(self, lg: dict[str, torch.Tensor], target: float, tol: float) -> dict[str, torch.Tensor]:
        """One-hot weights of the most probable combination of choices under the logits `lg` (at the
        end-of-training sharpness) among those whose cost ratio lies within `tol` of `target`; with none
        inside, the combination closest to `target`."""
        sharp = self.ecfg.scale_end / self.ecfg.tau_end
        idx = self._best_landing([F.log_softmax(lg[ax].double() * sharp, -1) for ax in self.axes], target, tol)
        return {ax: F.one_hot(idx[d], len(self.choices[ax])).float() for d, ax in enumerate(self.axes)}

    def _best_landing(self, scores: list[torch.Tensor], target: float, tol: float) -> torch.Tensor:
        """The choice index per axis [n_axes] of the combination with the highest summed per-axis `scores`
        (one [n_choices] tensor per axis, in `self.axes` order) among those whose cost ratio lies within `tol`
        of `target`; with none inside, the combination closest to `target`. No host sync (a training step's
        sample goes through here on the GPU)."""
        dev = (self.combo_costs() / target - 1).abs()  # [n_1, ..., n_axes]
        total = torch.zeros_like(dev)
        for d, sc in enumerate(scores):  # e.g. log p(combo) = sum over axes of log p(choice)
            shape = [1] * len(self.axes)
            shape[d] = -1
            total = total + sc.view(shape)
        inside = dev <= tol
        flat = torch.where(inside.any(), torch.where(inside, total, torch.full_like(total, -torch.inf)), -dev)
        return torch.stack(torch.unravel_index(flat.flatten().argmax(), dev.shape))

    # ------------------------------------------------------------------ from weights to an architecture
    def indices(self, weights: dict[str, torch.Tensor]) -> dict[str, int]:
        return {ax: int(w.detach().argmax()) for ax, w in weights.items()}

    def subarch(self, weights: dict[str, torch.Tensor]) -> SubArch:
        """The SubArch of each axis's argmax choice (axes the router doesn't control stay full)."""
        return self.at(self.indices(weights))

    def at(self, idx: dict[str, int]) -> SubArch:
        """The SubArch of the choices idx {axis: choice index}: widths, and the depth choice's `layers`."""
        kw = {ax: self.choices[ax][i] for ax, i in idx.items() if ax != DEPTH}
        if DEPTH in idx:
            kw["layers"] = self.layers_kept(self.choices[DEPTH][idx[DEPTH]])
        return SubArch(**kw)

    def chosen(self, weights: dict[str, torch.Tensor]) -> dict[str, int]:
        """{axis: the chosen width (depth: units kept)} of each axis's argmax choice (what the log records)."""
        return {ax: self.choices[ax][i] for ax, i in self.indices(weights).items()}

    def layers_kept(self, n_units: int) -> tuple[int, ...] | None:
        """The blocks that keeping `n_units` depth units leaves: all but those of the first
        (n_all - n_units) units of depth_order, as increasing block indices; None (all) at full depth."""
        drop = self.depth_order[: len(self.units) - n_units]
        if not drop:
            return None
        dropped = {b for u in drop for b in self.units[u]}
        return tuple(b for b in range(self.cfg.n_blocks) if b not in dropped)

    def gate(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Product of the chosen weights: exactly 1.0 in hard mode, but it carries the router's gradient
        when the student's logits are multiplied by it."""
        g = None
        for ax, i in self.indices(weights).items():
            g = weights[ax][i] if g is None else g * weights[ax][i]
        return g if g is not None else torch.ones(())

    def masks(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Soft mode: per-axis channel masks at full width, mask[i] = sum_j w_j [i < width_j] (the expected
        inclusion of channel i). Head axes are per head of a group; experts per expert; depth has no mask."""
        out = {}
        for ax, w in weights.items():
            if ax == DEPTH:  # no soft layer masks (ElasticConfig refuses depth in soft mode)
                continue
            widths = self.choices[ax]
            ind = (torch.arange(widths[0], device=w.device)[None, :]
                   < torch.tensor(widths, device=w.device)[:, None]).to(w.dtype)  # [n_choices, full]
            out[ax] = w @ ind
        return out

    def interpolate(self, frac: float, tol: float | None = None) -> SubArch:
        """A SubArch for a budget between trained ones: blend the two neighbouring one-hots linearly, then take
        each axis's argmax (tol=None) or, like `decode`, the most probable architecture whose cost lies within
        `tol` of `frac` (nothing guarantees that the per-axis argmax of a blend costs about `frac`). Outside
        the trained range it clamps to the nearest budget; 1.0 is the full model."""
        if frac >= 1.0:
            return SubArch()
        b = self.budgets
        if frac >= b[0]:
            return self.subarch(self.decode(0, tol))
        if frac <= b[-1]:
            return self.subarch(self.decode(len(b) - 1, tol))
        hi = max(i for i in range(len(b)) if b[i] >= frac)  # b[hi] >= frac > b[hi + 1]
        lo = hi + 1
        a = (frac - b[lo]) / (b[hi] - b[lo])
        with torch.no_grad():
            x = a * self.onehot(hi) + (1 - a) * self.onehot(lo)
            lg = self.logits(x)
            if tol is not None:
                return self.subarch(self._most_probable(lg, frac, tol))
        return self.at({ax: int(v.argmax()) for ax, v in lg.items()})

    # ------------------------------------------------------------------ cost
    def _build_cost_tables(self) -> None:
        """Per block kind present in the model: the cost of all its blocks on the grid of its elastic axes
        (depth first, when it is an axis: n_K[d] blocks of one block's cost); the base on the hidden grid."""
        cfg, count = self.cfg, self.count
        self.kind_axes: dict[str, tuple[str, ...]] = {}
        for kind in [""] + sorted(set(cfg.pattern)):
            axes = tuple(a for a in KIND_AXES[kind] if a in self.choices)
            one = dataclasses.replace(cfg, pattern=kind or cfg.pattern[0])
            two = dataclasses.replace(cfg, pattern=2 * (kind or cfg.pattern[0]))
            shape = [len(self.choices[a]) for a in axes]
            grid = torch.zeros(shape, dtype=torch.float64)
            combos = itertools.product(*[range(n) for n in shape])  # one empty combo when axes is empty
            for idx in combos:
                sub = SubArch(**{a: self.choices[a][i] for a, i in zip(axes, idx, strict=True)})
                block = count(two, sub) - count(one, sub)
                grid[tuple(idx)] = (count(one, sub) - block) if kind == "" else block
            if kind:
                n = self.kind_counts(kind)  # [n_depth] or [1]
                grid = n.view(-1, *[1] * len(axes)) * grid
                grid = grid if DEPTH in self.choices else grid[0]
                axes = ((DEPTH,) if DEPTH in self.choices else ()) + axes
            self.kind_axes[kind] = axes
            self.register_buffer(f"cost_{kind or 'base'}", grid, persistent=False)
        self.register_buffer("combo", self._combo_costs(), persistent=False)

    def kind_counts(self, kind: str) -> torch.Tensor:
        """Blocks of `kind` kept under each depth choice [n_depth] (float64); [1] (all of them) without depth."""
        if DEPTH not in self.choices:
            return torch.tensor([self.cfg.pattern.count(kind)], dtype=torch.float64)
        out = []
        for n in self.choices[DEPTH]:
            kept = self.layers_kept(n) or range(self.cfg.n_blocks)
            out.append(sum(self.cfg.pattern[b] == kind for b in kept))
        return torch.tensor(out, dtype=torch.float64)

    def cost(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expected cost (absolute units of the metric) of the architecture the weights choose; differentiable,
        exact at one-hot weights."""
        total = None
        w64 = {ax: w.to(torch.float64) for ax, w in weights.items()}  # the tables are float64
        for kind, axes in self.kind_axes.items():
            t = getattr(self, f"cost_{kind or 'base'}")
            for ax in axes:  # contract the leading axis each time
                t = torch.tensordot(w64[ax], t, dims=([0], [0]))
            total = t if total is None else total + t
        return total

    def combo_costs(self) -> torch.Tensor:
        """The cost ratio of every combination of choices: one dimension per axis (in `self.axes` order)."""
        return self.combo

    def _combo_costs(self) -> torch.Tensor:
        """combo_costs, built once from the per-kind tables: their sum, each broadcast over the axes it
        doesn't depend on."""
        total = 0.0
        for kind, axes in self.kind_axes.items():
            t = getattr(self, f"cost_{kind or 'base'}")
            if axes:
                t = t.permute(sorted(range(len(axes)), key=lambda i: self.axes.index(axes[i])))
            total = total + t.reshape([len(self.choices[a]) if a in axes else 1 for a in self.axes])
        return total / self.full_cost

    def expected_loss(self, weights: dict[str, torch.Tensor], loss_fn) -> torch.Tensor:
        """E[loss_fn(cost ratio)] under independent per-axis choice probabilities: the expected budget loss,
        not the loss of the expected cost. A mixture of a too-large and a too-small architecture can have
        exactly the target's expected cost while its argmax lands far from it; this expectation is zero only
        when the probability mass sits on architectures inside the loss's dead zone."""
        losses = loss_fn(self.combo_costs())
        for ax in self.axes:  # contract the leading axis each time
            losses = torch.tensordot(weights[ax].to(losses.dtype), losses, dims=([0], [0]))
        return losses

    def cost_ratio(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cost(weights) / self.full_cost
