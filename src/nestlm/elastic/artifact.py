"""The elastic checkpoint format, in one place: its file names, the manifest and router readers, budget
resolution, and the provenance of a sliced folder.

An elastic checkpoint folder is a standard Hugging Face checkpoint of the full sorted model plus

    nestlm_elastic.json   the manifest (MANIFEST_VERSION): {"version", "family", "metric", "budgets": {name:
                          {"fraction", "sub" (a SubArch dict), "params", "active_params", "cost_ratio", ...}},
                          "choices", "elastic" (the ElasticConfig the router was built from)}
    router.safetensors    the trained router's weights (a Router of that config)

and a folder sliced (or quantized at one budget) out of one carries nestlm_slice.json: where it came from.

    manifest = read_manifest(path)                        # None for a plain folder; CheckpointError if broken
    router = read_router(path, cfg, manifest)             # checked against the Router the manifest describes
    name, sub = resolve_budget(path, "60%")               # a name, '60%', 0.6, a trained fraction, a SubArch
    name, sub = resolve_budget(path, sub="hidden=448")    # explicit widths ("custom"); BudgetError if unknown

    export(model, router, ecfg, out)                      # writes the folder (manifest last), after training
    model, router, manifest = load_elastic(path)          # reads it back
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import yaml

from nestlm.arch import SubArch, count_active_params, count_params
from nestlm.elastic.config import ElasticConfig, budget_name, parse_fraction
from nestlm.elastic.router import Router
from nestlm.errors import BudgetError, CheckpointError, ConfigError
from nestlm.io.safetensors import read_tensors, write_tensors

__all__ = ["MANIFEST", "MANIFEST_VERSION", "ROUTER_FILE", "SLICE_FILE", "budget_name", "budget_subs", "check_manifest",
           "load_router_weights", "load_spec", "parse_sub", "provenance", "read_manifest", "read_provenance",
           "read_router", "resolve_budget", "router_file", "router_mismatch", "write_provenance"]

MANIFEST = "nestlm_elastic.json"  # an elastic checkpoint's manifest: budgets, their SubArch, the config
MANIFEST_VERSION = 1
ROUTER_FILE = "router.safetensors"  # its trained router, beside the HF weights
SLICE_FILE = "nestlm_slice.json"  # provenance written next to a sliced checkpoint (ignored by transformers)


# ---------------------------------------------------------------------------------------------- manifest
def read_manifest(path: str | Path, required: bool = False) -> dict | None:
    """The manifest of the folder `path`: None when it has none (a plain folder; CheckpointError when
    `required`), CheckpointError naming the file when it is not JSON, not a manifest or of another version."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        if required and not Path(path).exists():
            raise CheckpointError(f"{path}: no such folder")
        if required:
            raise CheckpointError(f"{path}: no {MANIFEST} (not an elastic checkpoint)")
        return None
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION:
        version = m.get("version") if isinstance(m, dict) else None
        raise CheckpointError(f"{f}: manifest version {version} is not {MANIFEST_VERSION}")
    if not isinstance(m.get("budgets"), dict) or not all(
            isinstance(b, dict) and "sub" in b and "fraction" in b for b in m["budgets"].values()):
        raise CheckpointError(f"{f}: no 'budgets' table of {{name: {{fraction, sub}}}} (not an elastic manifest)")
    return m


def budget_subs(manifest: dict | None) -> dict[str, SubArch]:
    """{budget name: SubArch} of a manifest, in its order ({} for None: a plain folder)."""
    return {name: SubArch.from_dict(b["sub"]) for name, b in (manifest or {"budgets": {}})["budgets"].items()}


def check_manifest(path: str | Path, cfg, manifest: dict) -> None:
    """CheckpointError when the manifest doesn't describe the weights' config `cfg` (another model's)."""
    where = f"{path}/{MANIFEST}"
    fam = manifest.get("family")
    if fam != cfg.family:
        raise CheckpointError(f"{where} is for family {fam!r} but the weights are {cfg.family!r}")
    for name, b in manifest["budgets"].items():
        try:
            sub = SubArch.from_dict(b["sub"])
            sub.resolve(cfg)
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: budget {name!r} doesn't fit the weights' config: {e}") from None
        if "params" in b and b["params"] != count_params(cfg, sub):
            raise CheckpointError(f"{where}: budget {name!r} lists {b['params']} parameters but the "
                                  f"weights' config gives {count_params(cfg, sub)} (manifest from another model?)")


def _config_and_manifest(path: Path):
    """(ModelConfig, manifest or None) of a folder, the manifest checked against the config: for
    resolve_budget given a bare path (nestlm.load.open_folder reads a whole folder, this, and more)."""
    from nestlm.convert import folder_config  # the families' config.json readers

    cfg = folder_config(path)
    manifest = read_manifest(path)
    if manifest is not None:
        check_manifest(path, cfg, manifest)
    return cfg, manifest


# ---------------------------------------------------------------------------------------------- router
def router_mismatch(state: dict, router) -> str | None:
    """None when the tensors `state` fit `router`, else which ones differ (file shape vs config shape)."""
    want = {k: tuple(v.shape) for k, v in router.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got == want:
        return None
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))[:4]
    return "; ".join(f"{k}: file {got.get(k)}, config {want.get(k)}" for k in diff)


def read_router(path: str | Path, cfg, manifest: dict):
    """The trained Router of the elastic checkpoint `path` (eval mode), built from the manifest's elastic
    config for the model config `cfg` and loaded from router.safetensors. CheckpointError naming the file
    for a bad config, a missing or unreadable file, or weights of another shape."""

    path = Path(path)
    mf = path / MANIFEST
    try:
        ecfg = ElasticConfig.from_dict(manifest["elastic"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{mf}: bad elastic config ({e})") from None
    try:
        router = Router(cfg, ecfg)
    except ConfigError as e:  # e.g. the depth axis without its depth_order
        raise CheckpointError(f"{mf}: the elastic config doesn't build a router for this model ({e})") from None
    diff = load_router_weights(router, path)
    if diff:
        raise CheckpointError(f"{router_file(path)}: the router weights don't match the manifest's elastic config "
                              f"{diff}")
    return router.eval()


def router_file(path: str | Path) -> Path:
    """The router file of the elastic checkpoint folder `path`, or `path` itself when it is that file."""
    path = Path(path)
    return path / ROUTER_FILE if path.is_dir() else path


def load_router_weights(router, path: str | Path, what: str = "the elastic checkpoint's router") -> str | None:
    """Load router_file(path) into `router`: None, or (nothing loaded) which tensors differ in shape
    (router_mismatch). CheckpointError naming the file for a missing or unreadable one."""
    state = read_tensors(router_file(path), what)
    diff = router_mismatch(state, router)
    if diff is None:
        router.load_state_dict(state)
    return diff


# ---------------------------------------------------------------------------------------------- budgets
FIELDS = tuple(f.name for f in dataclasses.fields(SubArch))
# total head counts, as HF configs give them: turned into per-group widths (whole groups only)
ALIASES = ("attn_heads", "mamba_heads")


def load_spec(spec: str | Path | dict) -> dict:
    """A --sub value as a dict: "k=v,k=v", a .yaml/.yml/.json file, or a dict."""
    if isinstance(spec, dict):
        return dict(spec)
    s = str(spec).strip()
    if s.endswith((".yaml", ".yml", ".json")):
        p = Path(s)
        if not p.is_file():
            raise ConfigError(f"--sub {s}: no such file")
        try:
            d = json.loads(p.read_text()) if s.endswith(".json") else yaml.safe_load(p.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--sub {s}: not valid {'JSON' if s.endswith('.json') else 'YAML'} ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"--sub {s}: expected a mapping of SubArch fields, got {type(d).__name__}")
        return d
    out = {}
    for part in filter(None, (x.strip() for x in s.split(","))):
        key, eq, val = part.partition("=")
        if not eq:
            raise ConfigError(f"--sub {s!r}: {part!r} is not key=value (e.g. hidden=1792,moe_ffn=1024)")
        out[key.strip()] = val.strip()
    if not out:
        raise ConfigError("--sub is empty: give key=value pairs, e.g. hidden=1792,moe_ffn=1024")
    return out


def _int(key: str, v) -> int:
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"--sub {key}={v!r}: not a whole number") from None


def parse_sub(spec: str | Path | dict, cfg) -> SubArch:
    """A SubArch from SubArch field names (hidden, moe_ffn, ..., layers as a list) plus the total head counts
    attn_heads / mamba_heads, checked against `cfg`: an unknown key, a width outside the model, or a total
    that would split a KV group or a Mamba group raises ConfigError naming it. Fields not given stay None
    (full width). (resolve_budget(path, sub=spec) is the entry point; this is its parser.)"""
    d = load_spec(spec)
    unknown = sorted(set(d) - set(FIELDS) - set(ALIASES))
    if unknown:
        raise ConfigError(f"--sub: unknown key {unknown[0]!r}; valid keys are {', '.join(FIELDS + ALIASES)}")
    kw = {k: (None if v is None else tuple(_int(k, i) for i in v) if k == "layers" else _int(k, v))
          for k, v in d.items() if k in FIELDS}
    if "layers" in d and not isinstance(d["layers"], (list, tuple)):
        raise ConfigError("--sub layers: give a list of block indices (in a .yaml / .json --sub file)")
    for alias, field, groups, what in (
            ("attn_heads", "attn_heads_per_group", kw.get("attn_kv_heads") or cfg.num_kv_heads, "KV groups"),
            ("mamba_heads", "mamba_heads_per_group", cfg.mamba_groups, "Mamba groups")):
        if alias not in d:
            continue
        n = _int(alias, d[alias])
        if not getattr(SubArch.full(cfg), field):
            raise ConfigError(f"--sub {alias}={n}: the model has no {'attention' if alias == 'attn_heads' else 'Mamba'}"
                              " heads")
        if field in kw:
            raise ConfigError(f"--sub: give {alias} or {field}, not both")
        if not groups or n % groups:
            raise ConfigError(f"--sub {alias}={n} breaks the model's {groups} {what}: heads are kept per group, "
                              f"so give a multiple of {groups} (or {field})")
        kw[field] = n // groups
    sub = SubArch(**kw)
    sub.resolve(cfg)  # ConfigError naming the field if a width is outside the model
    return sub


def _no_budget(path, budget, manifest: dict | None, why: str = "") -> BudgetError:
    """The one refusal of an unknown budget: what was asked, why not, and the budgets the checkpoint has."""
    names = list(manifest["budgets"]) if manifest else ["full"]
    where = f" in {path}" if path is not None else ""
    return BudgetError(f"no budget {budget!r}{where}{': ' + why if why else ''} (budgets: {names}; or a "
                       "fraction in (0, 1] or a percentage in (0%, 100%])")


def resolve_budget(path: str | Path | None, budget: str | float | SubArch | None = None, *,
                   sub: str | Path | dict | None = None, cfg=None, manifest: dict | None = None,
                   router=None) -> tuple[str, SubArch]:
    """(a display name, the SubArch) of `budget` for the checkpoint at `path`: the one place a budget is
    resolved (nestlm slice / eval / generate / quantize, the server's model names, --sub specs).

    budget: a manifest name ('full', '77%'); a fraction, as a number (0.6) or a string ('60%', '0.6'): a
    trained one -> its manifest entry, 1.0 -> the full model, one between two trained ones -> the router's
    interpolation within the checkpoint's landing_tolerance; or an explicit SubArch (checked against the
    config). router: a Router, or a callable returning one (called only to interpolate). sub (instead of budget): explicit widths, "hidden=1792,moe_ffn=1024", a dict or a .yaml /
    .json file (parse_sub) -> ("custom", SubArch). cfg / manifest / router: already read (else read from
    `path`; path=None: `manifest` alone, which resolves names and trained fractions).
    Raises BudgetError (a ConfigError listing the checkpoint's budgets) for a name or fraction the
    checkpoint doesn't have, ConfigError for widths that don't fit the model."""
    if path is not None:
        path = Path(path)
        if cfg is None:
            cfg, manifest = _config_and_manifest(path)
    if (budget is None) == (sub is None):
        raise TypeError("give one of budget or sub")
    if sub is not None:
        if cfg is None:
            raise TypeError("resolving explicit widths (sub) needs the model config: a path or cfg")
        return "custom", parse_sub(sub, cfg)
    if isinstance(budget, SubArch):
        if cfg is not None:
            budget.resolve(cfg)  # ConfigError, naming the axis, if it doesn't fit
        return "custom", budget
    if isinstance(budget, bool) or not isinstance(budget, (str, int, float)):
        raise TypeError(f"budget must be a name, a fraction or a SubArch, got {type(budget).__name__}")
    names = list(manifest["budgets"]) if manifest else []
    if isinstance(budget, str):
        if budget in names:
            return budget, budget_subs(manifest)[budget]
        same_case = [n for n in names if n.lower() == budget.strip().lower()]  # 'FULL', ' 75% '
        if same_case:
            return same_case[0], budget_subs(manifest)[same_case[0]]
        if budget.strip().lower() == "full":
            return "full", SubArch()
        frac = parse_fraction(budget)
        if frac is None:
            raise _no_budget(path, budget, manifest)
    else:
        frac = float(budget)
    if not 0 < frac <= 1:
        hint = f"did you mean '{budget}%'?" if isinstance(budget, str) and 1 < frac <= 100 and \
            not budget.strip().endswith("%") else ""
        raise _no_budget(path, budget, manifest, hint)
    if frac == 1.0:
        return "full", SubArch()
    if not manifest:
        raise _no_budget(path, budget, manifest, f"no {MANIFEST} (not an elastic checkpoint): its only budget "
                         "is 'full'")
    for name, b in manifest["budgets"].items():
        if math.isclose(b["fraction"], frac, rel_tol=1e-6):
            return name, budget_subs(manifest)[name]
    fracs = [b["fraction"] for b in manifest["budgets"].values()]
    if not min(fracs) < frac < max(fracs):
        raise _no_budget(path, budget, manifest, f"{frac:g} is outside the trained range "
                         f"{min(fracs):g}..{max(fracs):g}; pick a trained budget or a fraction in between")
    if not isinstance(router, Router):  # None (read it from path) or a callable that reads it
        if router is None and path is None:
            raise _no_budget(path, budget, manifest, "it lies between trained budgets: interpolating needs the "
                             "router")
        router = router() if router is not None else read_router(path, cfg, manifest)
    # within the landing tolerance of frac, like the trained budgets
    sub = router.interpolate(frac, router.ecfg.landing_tolerance)
    if cfg is not None and sub.resolve(cfg) == SubArch.full(cfg):  # say so: no smaller architecture was found
        return f"{budget_name(frac)} (interpolated: the full model)", sub
    return f"{budget_name(frac)} (interpolated)", sub


# ---------------------------------------------------------------------------------------------- provenance
def provenance(source: str | Path, budget: str, sub: SubArch, cfg, **extra) -> dict:
    """nestlm_slice.json's content: the source folder, the budget's name, its resolved SubArch, the family,
    parameter counts; `extra` (quant_format, ...) is added."""
    s = sub.resolve(cfg)
    return {"source": str(Path(source).resolve()), "budget": budget, "sub": s.to_dict(), "family": cfg.family,
            "params": count_params(cfg, s), "active_params": count_active_params(cfg, s), **extra}


def write_provenance(folder: str | Path, prov: dict) -> None:
    (Path(folder) / SLICE_FILE).write_text(json.dumps(prov, indent=2))


def read_provenance(folder: str | Path) -> dict | None:
    """nestlm_slice.json of a sliced folder, or None."""
    f = Path(folder) / SLICE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def manifest_for(model, router: Router, ecfg: ElasticConfig) -> dict:
    """Every budget's architecture: the router's most probable one within ecfg.landing_tolerance of the
    budget (Router.decode), its parameters and its cost ratio."""
    # training sampled only architectures within sample_tolerance: with the same tolerance, decode is the
    # noise-free end of what training sampled, whatever the per-axis argmax says
    trained = ecfg.mode == "hard" and ecfg.sample_tolerance is not None and ecfg.sample_tolerance == ecfg.landing_tolerance
    budgets = {}
    for i, frac in enumerate(ecfg.budgets):
        sub = router.subarch(router.decode(i, ecfg.landing_tolerance)) if not router.pinned(i) else SubArch()
        ratio = float(router.count(model.cfg, sub)) / router.full_cost
        budgets[budget_name(frac)] = {
            "fraction": frac, "sub": sub.to_dict(),
            "params": count_params(model.cfg, sub), "active_params": count_active_params(model.cfg, sub),
            "cost_ratio": ratio}
        argmax = router.subarch(router.greedy(i))
        if not router.pinned(i) and argmax != sub:  # the router's own choice missed: say so, keep it
            a_ratio = float(router.count(model.cfg, argmax)) / router.full_cost
            budgets[budget_name(frac)].update(argmax_sub=argmax.to_dict(), argmax_cost_ratio=a_ratio)
            if not trained:
                warnings.warn(f"budget {budget_name(frac)}: the router's per-axis choice costs {a_ratio:.3f} "
                              f"(target {frac}); the manifest uses its most probable architecture within "
                              f"{ecfg.landing_tolerance:.0%} ({ratio:.3f}), which training may have sampled "
                              "rarely: check its quality, or train longer (the argmax is kept as argmax_sub)",
                              stacklevel=2)
    return {"version": MANIFEST_VERSION, "family": model.cfg.family, "metric": ecfg.metric,
            "budgets": budgets, "choices": router.choices, "elastic": ecfg.to_dict()}


def export(model, router: Router, ecfg: ElasticConfig, out_dir: str | Path) -> Path:
    """Write the elastic checkpoint into `out_dir` (other files there, like train/, are kept). Every file is
    written to a temporary folder first and moved in with os.replace; the manifest goes last."""
    from nestlm.convert import to_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.tmp", dir=out))
    try:
        if ecfg.quant:  # QAD: the latent weights (nestlm quantize packs them exactly as the student saw them)
            from nestlm.quant.fake import fake_quant_disabled

            with fake_quant_disabled(model):
                to_hf(model, tmp / "hf", overwrite=True)
        else:
            to_hf(model, tmp / "hf", overwrite=True)
        write_tensors(tmp / "hf" / ROUTER_FILE, router.state_dict())
        (tmp / MANIFEST).write_text(json.dumps(manifest_for(model, router, ecfg), indent=2))
        for f in sorted((tmp / "hf").iterdir()):
            os.replace(f, out / f.name)
        os.replace(tmp / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

