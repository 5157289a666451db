"""ElasticConfig: everything elastic distillation needs besides the model and the data, in one YAML file.

    cfg = ElasticConfig.load("elastic.yaml")       # or ElasticConfig(budgets=[1.0, 0.7, 0.5], steps=...)
    cfg.save("out/elastic.yaml")
    choices = cfg.resolve_choices(model.cfg)       # {axis: [widths, largest first]} validated against the model

Budgets are fractions of the full model's cost (`metric`: params | active | memory). A budget of 1.0 is the
full model itself and is pinned (the router never shrinks it). Each elastic axis (a width field of
`SubArch`) has a list of choices, largest first: fractions of the full width (floats) or explicit widths
(ints). Fractions must land on valid widths: channels a multiple of `align`, heads a whole number per group.

Depth is an opt-in axis (not in the default choices): `choices["depth"]` lists how many depth units each
choice keeps (`arch.depth_units`: a block, or an attention+MLP pair for Llama-like families), largest first,
as fractions of all units (rounded to the nearest whole count, halves up) or as counts (ints). Which units go
first is `depth_order` (unit indices, least important first): `elastify` scores it on the calibration
batches when it is None, and the manifest's `elastic` section keeps the order it used. Hard mode only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nestlm.arch import SubArch, depth_units
from nestlm.elastic.optim import lr_at
from nestlm.errors import ConfigError
from nestlm.model.config import ModelConfig
from nestlm.model.layout import FIELD_AXIS, ROUTED

METRICS = ("params", "active", "memory")
# the SubArch width fields a router may choose, in the router's order (nestlm.model.layout.ROUTED)
AXES = tuple(a.field for a in ROUTED)
DEPTH = "depth"  # the router axis that chooses how many depth units to keep (SubArch.layers)


def _default_choices() -> dict:
    return {
        "hidden": [1.0, 0.875, 0.75, 0.625, 0.5],
        "ffn": [1.0, 0.75, 0.5, 0.25],
        "moe_ffn": [1.0, 0.75, 0.5],
        "shared_ffn": [1.0, 0.75, 0.5],
        "mamba_heads_per_group": [1.0, 0.75, 0.5],
        "attn_heads_per_group": [1.0, 0.5],
        "experts": [1.0, 0.75, 0.5],
    }


@dataclass
class ElasticConfig:
    # ---- what to train
    budgets: list[float] = field(default_factory=lambda: [1.0, 0.77, 0.4])
    metric: str = "params"  # params | active | memory (weights + KV cache + SSM state at memory_seq_len)
    memory_seq_len: int = 4096
    choices: dict = field(default_factory=_default_choices)
    axes: list[str] | None = None  # elastic axes; None: every axis in `choices` that the model has
    depth_order: list[int] | None = None  # depth units, least important (dropped first) first; None: scored
    #                                       by elastify on the calibration batches (only used with "depth")
    align: int = 8  # channel widths must be multiples of this (keeps quantization blocks aligned)
    mode: str = "hard"  # hard: sliced student (compute follows the budget) | soft: masked full-width student
    sort: bool = True  # score importance on `calib_batches` batches and sort the parent before training
    quant: str | None = None  # None | "fp8" | "nvfp4": a fake-quantized student (QAD, see nestlm.quant)
    calib_batches: int = 4
    # ---- router
    router_hidden: int = 256
    tau_start: float = 1.0  # Gumbel-Softmax temperature, annealed exponentially
    tau_end: float = 0.05
    scale_start: float = 1.0  # logit scale, ramped linearly (sharpens the choice as training goes)
    scale_end: float = 10.0
    router_weight: float = 1.0  # lambda on the budget loss
    dead_zone: float = 0.0  # relative cost deviation that costs nothing
    router_bound: str = "softsign"  # how logits are bounded to (-1, 1): softsign (does not saturate) | tanh
    expected_loss_weight: float = 1.0  # add E[budget loss] over the choice distribution (0: off)
    expected_loss_sharpness: float = 10.0  # cap on logit scale / tau for that expectation
    expected_loss_dead_zone: float = 0.01
    sample_tolerance: float | None = 0.02  # hard mode: training samples only architectures within this relative
    #                                        cost deviation of their budget (None: each axis samples alone); the
    #                                        fidelity protocol's measurement is in docs/results.md (issue 18)
    landing_tolerance: float | None = 0.02  # inference picks the most probable architecture within this
    #                                         relative cost deviation (Router.decode); None: per-axis argmax
    # ---- distillation
    kd_temperature: float = 1.0
    p_full: float = 0.5  # stage 1: probability of the full model; the other budgets share the rest uniformly
    stage2_start: float = 1.0  # fraction of `steps` after which stage 2 begins (1.0: no stage 2)
    stage2_weights: list[float] | None = None  # stage 2 budget probabilities, e.g. [0.5, 0.3, 0.2]
    stage2_seq_len: int | None = None  # stage 2 context length (None: seq_len)
    budgets_per_step: int | None = None  # budgets trained on each batch (drawn without replacement), one teacher
    #                                      forward; None: every budget on every batch (docs/results.md, issue 29)
    full_weight: float = 1.0  # weight of the full model's KD loss against each smaller budget's
    # ---- optimisation
    lr_model: float = 1e-4
    lr_router: float = 1e-2
    lr_schedule: str = "cosine"  # the model's lr after warmup: constant | cosine (down to lr_model / 10)
    lr_warmup: float = 0.1  # fraction of the model's steps with a linear lr warmup
    router_warmup: float = 0.0  # fraction of steps, at the start, that train the router alone (model frozen)
    router_settle: float = 1.0  # fraction of steps after which the router is frozen and each budget trains the
    #                             one architecture it exports (Router.decode at landing_tolerance); 1.0: never
    weight_decay: float = 0.0
    steps: int = 1000
    batch: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 1
    activation_checkpointing: bool = False  # recompute each block in the backward (memory for compute)

    def __post_init__(self):
        self.validate()

    # ---------------------------------------------------------------- validation (model-independent)
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"ElasticConfig: {msg}")

        for f in dataclasses.fields(self):  # numbers: show what was read (YAML reads `steps: 2OO` as text)
            v = getattr(self, f.name)
            if f.type in ("float", "float | None") and isinstance(v, str) and parse_fraction(v) is not None \
                    and not v.strip().endswith("%"):
                setattr(self, f.name, float(v))  # YAML 1.1 reads 1e-3 (no dot) as text
            elif f.type in ("int", "float", "int | None", "float | None") and v is not None and (
                    isinstance(v, bool) or not isinstance(v, (int, float)) or (f.type.startswith("int")
                                                                              and isinstance(v, float))):
                need(False, f"{f.name} must be {'an int' if f.type.startswith('int') else 'a number'}, got {v!r}")
        b = self.budgets
        need(isinstance(b, (list, tuple)) and len(b) > 0, f"budgets must be a non-empty list of fractions, got {b!r}")
        b = [parse_fraction(x) if isinstance(x, str) and parse_fraction(x) is not None else x for x in b]  # '75%'
        need(all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in b),
             f"budgets must be in (0, 1], got {self.budgets} (fractions, or percentages such as '75%')")
        need(all(b[i] > b[i + 1] for i in range(len(b) - 1)), f"budgets must be strictly decreasing, got {b}")
        self.budgets = [float(x) for x in b]
        need(self.metric in METRICS, f"metric must be one of {METRICS}, got {self.metric!r}")
        need(self.mode in ("hard", "soft"), f"mode must be hard or soft, got {self.mode!r}")
        need(self.quant in (None, "fp8", "nvfp4"), f"quant must be null, fp8 or nvfp4, got {self.quant!r}")
        need(isinstance(self.choices, dict) and self.choices, "choices must map axis names to lists")
        unknown = sorted(set(self.choices) - set(AXES) - {DEPTH})
        need(not unknown, f"unknown axes in choices {unknown}; elastic axes are {[*AXES, DEPTH]}")
        for ax, lst in self.choices.items():
            need(isinstance(lst, (list, tuple)) and len(lst) > 0, f"choices[{ax!r}] must be a non-empty list")
            need(all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in lst),
                 f"choices[{ax!r}] must hold positive fractions or widths, got {lst}")
            if len({isinstance(v, float) for v in lst}) == 1:  # mixed lists are checked as widths
                need(all(lst[i] > lst[i + 1] for i in range(len(lst) - 1)),
                     f"choices[{ax!r}] must be strictly decreasing (largest first), got {lst}")
        if self.axes is not None:
            missing = [a for a in self.axes if a not in self.choices]
            need(not missing, f"axes {missing} have no entry in choices")
        need(not (self.depth_axis and self.mode == "soft"),
             "the depth axis needs mode: hard (soft mode masks channels; there are no soft layer masks)")
        d = self.depth_order
        need(d is None or (isinstance(d, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in d)),
             f"depth_order must be a list of depth unit indices, got {d!r}")
        need(self.align >= 1 and self.router_hidden >= 1, "align and router_hidden must be >= 1")
        need(0 < self.tau_end <= self.tau_start, "need 0 < tau_end <= tau_start")
        need(0 < self.scale_start and 0 < self.scale_end, "logit scales must be positive")
        need(self.router_weight >= 0 and self.dead_zone >= 0, "router_weight and dead_zone must be >= 0")
        need(self.landing_tolerance is None or self.landing_tolerance >= 0, "landing_tolerance must be >= 0")
        need(self.sample_tolerance is None or self.sample_tolerance >= 0, "sample_tolerance must be >= 0")
        need(self.router_bound in ("softsign", "tanh"), f"router_bound must be softsign or tanh, got {self.router_bound!r}")
        need(self.expected_loss_weight >= 0 and self.expected_loss_sharpness > 0 and self.expected_loss_dead_zone >= 0,
             "expected_loss_weight and expected_loss_dead_zone must be >= 0, expected_loss_sharpness > 0")
        need(self.kd_temperature > 0, "kd_temperature must be positive")
        need(0 <= self.p_full <= 1, f"p_full must be in [0, 1], got {self.p_full}")
        need(0 <= self.stage2_start <= 1, "stage2_start is a fraction of steps in [0, 1]")
        if self.stage2_weights is not None:
            w = self.stage2_weights
            need(len(w) == len(b), f"stage2_weights has {len(w)} entries for {len(b)} budgets")
            need(all(x >= 0 for x in w) and sum(w) > 0, "stage2_weights must be >= 0 with a positive sum")
        for name in ("steps", "batch", "seq_len", "grad_accum", "checkpoint_every", "log_every", "memory_seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        need(self.stage2_seq_len is None or self.stage2_seq_len >= 1, "stage2_seq_len must be >= 1")
        need(self.lr_model >= 0 and self.lr_router >= 0, "learning rates must be >= 0")
        need(self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        need(0 <= self.lr_warmup < 1 and 0 <= self.router_warmup < 1, "lr_warmup and router_warmup are fractions "
             f"of steps in [0, 1), got {self.lr_warmup} and {self.router_warmup}")
        need(0 < self.router_settle <= 1 and self.router_settle >= self.router_warmup, "router_settle is a "
             f"fraction of steps in (0, 1], not before router_warmup, got {self.router_settle}")
        need(self.budgets_per_step is None or (isinstance(self.budgets_per_step, int) and not isinstance(
             self.budgets_per_step, bool) and 1 <= self.budgets_per_step <= len(b)), f"budgets_per_step must be an "
             f"int in 1..{len(b)} (the number of budgets) or null (all), got {self.budgets_per_step!r}")
        need(self.full_weight >= 0, f"full_weight must be >= 0, got {self.full_weight}")
        need(isinstance(self.activation_checkpointing, bool), "activation_checkpointing must be true or false")

    @property
    def depth_axis(self) -> bool:
        """Whether the router chooses depth (every model has depth units, so this needs no model)."""
        return DEPTH in self.choices and (self.axes is None or DEPTH in self.axes)

    # ---------------------------------------------------------------- validation against a model
    def resolve_choices(self, cfg: ModelConfig) -> dict[str, list[int]]:
        """{axis: [widths, largest first]} for the elastic axes of `cfg`; the first choice is the full width.
        The depth axis (last, when chosen) gives depth unit counts, the first one all units.
        Raises ConfigError naming the axis and the divisibility rule a choice breaks."""
        full = SubArch.full(cfg)
        present = {a.field for a in ROUTED if getattr(full, a.field) and any(k in cfg.pattern for k in a.kinds)}
        if self.axes is None:
            axes = [a for a in AXES if a in self.choices and a in present]
        else:
            absent = [a for a in self.axes if a not in present and a != DEPTH]
            if absent:
                raise ConfigError(f"ElasticConfig: axes {absent} are elastic but the model has no such width "
                                  f"(pattern {cfg.pattern!r})")
            axes = [a for a in AXES if a in self.axes]
        out = {}
        for ax in axes:
            f = getattr(full, ax)
            widths = []
            for v in self.choices[ax]:
                w = self._width(ax, v, f, cfg)
                widths.append(w)
            if widths[0] != f:
                raise ConfigError(f"ElasticConfig: choices[{ax!r}] must start with the full width {f} "
                                  f"(1.0), got {self.choices[ax][0]} -> {widths[0]}")
            if any(widths[i] <= widths[i + 1] for i in range(len(widths) - 1)):
                raise ConfigError(f"ElasticConfig: choices[{ax!r}] = {self.choices[ax]} give widths {widths} "
                                  f"(full width {f}): they must be strictly decreasing")
            out[ax] = widths
        if self.depth_axis:
            out[DEPTH] = self._depth_counts(cfg)
        return out

    def _depth_counts(self, cfg: ModelConfig) -> list[int]:
        """choices["depth"] as unit counts [all units, ..., fewest], checked against the model's depth units;
        depth_order (when set) must be a permutation of those units."""
        n = len(depth_units(cfg))
        lst = self.choices[DEPTH]
        where = f"ElasticConfig: choices[{DEPTH!r}] = {lst}"
        counts = []
        for v in lst:
            if isinstance(v, float) and v > 1:
                raise ConfigError(f"{where}: fractions must be <= 1.0 (write unit counts as ints)")
            counts.append(math.floor(v * n + 0.5) if isinstance(v, float) else int(v))  # halves round up
        if any(not 1 <= c <= n for c in counts):
            raise ConfigError(f"{where} gives unit counts {counts}, outside 1..{n} (the model has {n} depth units)")
        if counts[0] != n:
            raise ConfigError(f"{where} must start with all {n} depth units (1.0), got {counts[0]}")
        if any(counts[i] <= counts[i + 1] for i in range(len(counts) - 1)):
            raise ConfigError(f"{where} gives unit counts {counts} (of {n} depth units): they must be strictly "
                              "decreasing")
        if self.depth_order is not None and sorted(self.depth_order) != list(range(n)):
            raise ConfigError(f"ElasticConfig: depth_order {self.depth_order} must hold each of the model's {n} "
                              f"depth units 0..{n - 1} once")
        return counts

    def _width(self, ax: str, v, full: int, cfg: ModelConfig) -> int:
        where = f"ElasticConfig: choices[{ax!r}] value {v}"
        if isinstance(v, float):
            if v > 1:
                raise ConfigError(f"{where}: fractions must be <= 1.0 (write explicit widths as ints)")
            w = v * full
            if abs(w - round(w)) > 1e-6:
                raise ConfigError(f"{where} gives {w:g} of {full}: not a whole number")
            w = round(w)
        else:
            w = int(v)
        if not 1 <= w <= full:
            raise ConfigError(f"{where} gives width {w}, outside 1..{full}")
        if FIELD_AXIS[ax].unit == "channel" and w != full and w % self.align:
            raise ConfigError(f"{where} gives {w} channels (of {full}): not a multiple of align={self.align}")
        if FIELD_AXIS[ax].unit == "expert":
            if w < cfg.top_k:
                raise ConfigError(f"{where} keeps {w} experts, fewer than top_k={cfg.top_k}")
            if w != full and cfg.n_expert_groups > 1:
                raise ConfigError(f"{where}: slicing experts needs n_expert_groups == 1")
        return w

    # ---------------------------------------------------------------- schedules and sampling
    def budget_name(self, i: int) -> str:
        return budget_name(self.budgets[i])

    def stage2_step(self) -> int:
        return int(round(self.stage2_start * self.steps))

    def budget_probs(self, step: int) -> list[float]:
        """Probability of each budget at `step`: stage 1 gives p_full to 1.0 and splits the rest uniformly;
        stage 2 uses stage2_weights (normalised)."""
        n = len(self.budgets)
        if step >= self.stage2_step() and self.stage2_weights is not None:
            s = sum(self.stage2_weights)
            return [w / s for w in self.stage2_weights]
        if self.budgets[0] != 1.0 or n == 1:
            return [1.0 / n] * n
        return [self.p_full] + [(1 - self.p_full) / (n - 1)] * (n - 1)

    def sample_budgets(self, rng, step: int) -> list[int]:
        """The budgets (indices, largest first) trained at `step`: budgets_per_step draws without replacement
        from budget_probs(step). One draw takes exactly the random numbers that a single budget always took."""
        probs = self.budget_probs(step)
        left = [i for i, p in enumerate(probs) if p > 0]
        picked = []
        while left and len(picked) < (self.budgets_per_step or len(self.budgets)):
            i = rng.choices(left, weights=[probs[j] for j in left])[0]
            picked.append(i)
            left.remove(i)
        return sorted(picked)

    def model_steps(self) -> tuple[int, int]:
        """(first step that updates the model, warmup steps of its lr): the router trains alone before."""
        first = int(round(self.router_warmup * self.steps))
        return first, int(round(self.lr_warmup * (self.steps - first)))

    def settle_step(self) -> int:
        """The first step at which the router is frozen and every budget trains its exported architecture."""
        return int(round(self.router_settle * self.steps))  # router_settle 1.0: steps, never

    def lr_model_at(self, step: int) -> float:
        """The model's learning rate at `step`: 0 while the router trains alone, then warmup and schedule."""
        first, warmup = self.model_steps()
        if step < first:
            return 0.0
        return lr_at(step - first, self.steps - first, self.lr_model, warmup, self.lr_schedule)

    def seq_len_at(self, step: int) -> int:
        if step >= self.stage2_step() and self.stage2_seq_len is not None:
            return self.stage2_seq_len
        return self.seq_len

    def tau_at(self, step: int) -> float:  # exponential anneal tau_start -> tau_end
        r = step / max(self.steps - 1, 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** r

    def scale_at(self, step: int) -> float:  # linear ramp scale_start -> scale_end
        r = step / max(self.steps - 1, 1)
        return self.scale_start + (self.scale_end - self.scale_start) * r

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ElasticConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"ElasticConfig: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"ElasticConfig: unknown keys {unknown}; valid keys are {sorted(names)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"ElasticConfig: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> ElasticConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"ElasticConfig: {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:  # a binary file given by mistake
            raise ConfigError(f"ElasticConfig: {path} is not a YAML text file (byte {e.start}: {e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"ElasticConfig: {path} is not valid YAML ({' '.join(str(e).split())})") from None
        try:
            return cls.from_dict(d or {})
        except ConfigError as e:  # say which file
            raise ConfigError(f"{path}: {e}") from None


def parse_fraction(s: str) -> float | None:
    """'60%' -> 0.6, '0.6' -> 0.6, anything else -> None: how budgets are written on the command line and
    in the YAML (nestlm.elastic.artifact.resolve_budget reads them with it)."""
    s = s.strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        return None


def budget_name(frac: float) -> str:
    """1.0 -> 'full', 0.77 -> '77%', 0.125 -> '12.5%'."""
    return "full" if frac == 1.0 else f"{frac * 100:.4g}%"
