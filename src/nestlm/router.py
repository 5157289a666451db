"""Router: a budget -> a nested architecture, learned end to end with the distillation loss.

For every elastic axis (a width field of SubArch: hidden, ffn, mamba_heads_per_group, ...):

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
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.arch import SubArch, count_active_params, count_memory, count_params
from nestlm.config import ElasticConfig
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
        self.choices = ecfg.resolve_choices(cfg)  # {axis: [widths, largest first]}
        self.axes = list(self.choices)
        self.budgets = list(ecfg.budgets)
        nb, hd = len(self.budgets), ecfg.router_hidden
        self.nets = nn.ModuleDict({
            ax: nn.Sequential(nn.Linear(nb, hd), nn.LeakyReLU(), nn.Linear(hd, len(ch)))
            for ax, ch in self.choices.items()})
        self.count = cost_fn(ecfg.metric, ecfg.memory_seq_len)
        self.full_cost = float(self.count(cfg))
        self._build_cost_tables()

    # ------------------------------------------------------------------ logits and sampling
    def onehot(self, budget_idx: int) -> torch.Tensor:
        dev = next(self.parameters()).device
        return F.one_hot(torch.tensor(budget_idx, device=dev), len(self.budgets)).float()

    def logits(self, budget_in: torch.Tensor) -> dict[str, torch.Tensor]:
        """budget_in: [n_budgets] (a one-hot, or a blend for interpolation) -> {axis: logits [n_choices]}.

        Logits are bounded to (-1, 1) by tanh, so that the schedules (logit scale 1 -> 10, tau 1 -> 0.05), not
        the optimizer, decide how peaked the choice is: unbounded logits saturate the softmax within a few
        steps, after which the cost gradient vanishes and the router locks on an early guess."""
        bound = F.softsign if self.ecfg.router_bound == "softsign" else torch.tanh  # softsign saturates slowly
        return {ax: bound(net(budget_in)) for ax, net in self.nets.items()}

    def pinned(self, budget_idx: int) -> bool:
        return self.budgets[budget_idx] == 1.0

    def full_weights(self) -> dict[str, torch.Tensor]:
        dev = next(self.parameters()).device
        return {ax: F.one_hot(torch.tensor(0, device=dev), len(ch)).float() for ax, ch in self.choices.items()}

    def sample(self, budget_idx: int, tau: float = 1.0, scale: float = 1.0, hard: bool = True,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-axis Gumbel-Softmax weights [n_choices]. hard: one-hot values, soft gradients (straight
        through). The full budget (1.0) is pinned: constant one-hots on the full width, no gradient."""
        if self.pinned(budget_idx):
            return self.full_weights()
        out = {}
        for ax, lg in self.logits(self.onehot(budget_idx)).items():
            u = torch.rand(lg.shape, generator=generator, device=lg.device).clamp_(1e-10, 1 - 1e-10)
            gumbel = -torch.log(-torch.log(u))
            y = torch.softmax((lg * scale + gumbel) / tau, dim=-1)
            if hard:  # value: the sampled one-hot; gradient: the noise-free softmax (see the class doc)
                p = torch.softmax(lg * scale / tau, dim=-1)
                y = F.one_hot(y.argmax(), y.shape[-1]).to(y.dtype) - p.detach() + p
            out[ax] = y
        return out

    def probs(self, budget_idx: int, tau: float = 1.0, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Noise-free choice probabilities softmax(logits * scale / tau) per axis: the router loss is taken on
        the expected cost under these (smooth, so the router settles on the budget instead of oscillating
        between the corners a sampled cost's sign-like gradient pushes it to)."""
        if self.pinned(budget_idx):
            return self.full_weights()
        return {ax: torch.softmax(v * scale / tau, dim=-1) for ax, v in self.logits(self.onehot(budget_idx)).items()}

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
        sharp = self.ecfg.scale_end / self.ecfg.tau_end
        with torch.no_grad():
            lg = self.logits(self.onehot(budget_idx))
            dev = self.relative_deviation(budget_idx)  # [n_1, ..., n_axes]
            score = torch.zeros_like(dev)
            for d, ax in enumerate(self.axes):  # log p(combo) = sum over axes of log p(choice)
                shape = [1] * len(self.axes)
                shape[d] = -1
                score = score + F.log_softmax(lg[ax].double() * sharp, -1).view(shape)
            inside = dev <= tol
            flat = torch.where(inside, score, torch.full_like(score, -torch.inf)) if inside.any() else -dev
            idx = torch.unravel_index(flat.flatten().argmax(), dev.shape)
        return {ax: F.one_hot(idx[d], len(self.choices[ax])).float() for d, ax in enumerate(self.axes)}

    def relative_deviation(self, budget_idx: int) -> torch.Tensor:
        """|cost / budget - 1| of every combination of choices (one dimension per axis)."""
        return (self.combo_costs() / self.budgets[budget_idx] - 1).abs()

    # ------------------------------------------------------------------ from weights to an architecture
    def indices(self, weights: dict[str, torch.Tensor]) -> dict[str, int]:
        return {ax: int(w.detach().argmax()) for ax, w in weights.items()}

    def subarch(self, weights: dict[str, torch.Tensor]) -> SubArch:
        """The SubArch of each axis's argmax choice (axes the router doesn't control stay full)."""
        return SubArch(**{ax: self.choices[ax][i] for ax, i in self.indices(weights).items()})

    def gate(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Product of the chosen weights: exactly 1.0 in hard mode, but it carries the router's gradient
        when the student's logits are multiplied by it."""
        g = None
        for ax, i in self.indices(weights).items():
            g = weights[ax][i] if g is None else g * weights[ax][i]
        return g if g is not None else torch.ones(())

    def masks(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Soft mode: per-axis channel masks at full width, mask[i] = sum_j w_j [i < width_j] (the expected
        inclusion of channel i). Head axes are per head of a group; experts per expert."""
        out = {}
        for ax, w in weights.items():
            widths = self.choices[ax]
            ind = (torch.arange(widths[0], device=w.device)[None, :]
                   < torch.tensor(widths, device=w.device)[:, None]).to(w.dtype)  # [n_choices, full]
            out[ax] = w @ ind
        return out

    def interpolate(self, frac: float) -> SubArch:
        """A SubArch for a budget between trained ones: blend the two neighbouring one-hots linearly and take
        each axis's argmax. Outside the trained range it clamps to the nearest budget; 1.0 is the full model."""
        if frac >= 1.0:
            return SubArch()
        b = self.budgets
        if frac >= b[0]:
            return self.subarch(self.greedy(0))
        if frac <= b[-1]:
            return self.subarch(self.greedy(len(b) - 1))
        hi = max(i for i in range(len(b)) if b[i] >= frac)  # b[hi] >= frac > b[hi + 1]
        lo = hi + 1
        a = (frac - b[lo]) / (b[hi] - b[lo])
        with torch.no_grad():
            x = a * self.onehot(hi) + (1 - a) * self.onehot(lo)
            lg = self.logits(x)
        return SubArch(**{ax: self.choices[ax][int(v.argmax())] for ax, v in lg.items()})

    # ------------------------------------------------------------------ cost
    def _build_cost_tables(self) -> None:
        """Per block kind present in the model: the cost of one block on the grid of its elastic axes."""
        cfg, count = self.cfg, self.count
        self.kind_counts = {k: cfg.pattern.count(k) for k in sorted(set(cfg.pattern))}
        self.kind_axes: dict[str, tuple[str, ...]] = {}
        for kind in [""] + list(self.kind_counts):
            axes = tuple(a for a in KIND_AXES[kind] if a in self.choices)
            self.kind_axes[kind] = axes
            one = dataclasses.replace(cfg, pattern=kind or cfg.pattern[0])
            two = dataclasses.replace(cfg, pattern=2 * (kind or cfg.pattern[0]))
            shape = [len(self.choices[a]) for a in axes]
            grid = torch.zeros(shape, dtype=torch.float64)
            combos = itertools.product(*[range(n) for n in shape])  # one empty combo when axes is empty
            for idx in combos:
                sub = SubArch(**{a: self.choices[a][i] for a, i in zip(axes, idx, strict=True)})
                block = count(two, sub) - count(one, sub)
                grid[tuple(idx)] = (count(one, sub) - block) if kind == "" else block
            self.register_buffer(f"cost_{kind or 'base'}", grid, persistent=False)

    def cost(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expected cost (absolute units of the metric) of the architecture the weights choose; differentiable,
        exact at one-hot weights."""
        total = None
        for kind, axes in self.kind_axes.items():
            t = getattr(self, f"cost_{kind or 'base'}")
            for ax in axes:  # contract the leading axis each time
                t = torch.tensordot(weights[ax].to(t.dtype), t, dims=([0], [0]))
            t = t * (self.kind_counts[kind] if kind else 1)
            total = t if total is None else total + t
        return total

    def combo_costs(self) -> torch.Tensor:
        """The cost ratio of every combination of choices: one dimension per axis (in `self.axes` order), the
        sum of the per-kind tables broadcast over the axes they don't depend on."""
        total = 0.0
        for kind, axes in self.kind_axes.items():
            t = getattr(self, f"cost_{kind or 'base'}") * (self.kind_counts[kind] if kind else 1)
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
