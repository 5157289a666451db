"""The one slicing rule (nestlm.model.layout) against a slow, independent statement of it, and the proof that
nothing outside a mixer reaches into the mixer's privates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_hybrid_config
from torch.testing import assert_close

import nestlm
from nestlm import SubArch
from nestlm.model import layout
from nestlm.model.extract import sliced_state_dict

SRC = Path(nestlm.__file__).parent


def _first_of_groups(groups: int, per: int, keep: int, width: int = 1, groups_kept: int | None = None) -> list[int]:
    """The channels of the first `keep` units of each of the first `groups_kept` groups, spelled out."""
    out = []
    for g in range(groups if groups_kept is None else groups_kept):
        for u in range(keep):
            unit = g * per + u
            out += [unit * width + c for c in range(width)]
    return out


def _reference_rows(cfg, s) -> dict[str, list[int]]:
    """Kept rows of the head-coupled tensors, written out from DESIGN.md's rules (no layout code)."""
    hd, r = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    h, p, g, n = cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.ssm_state
    m = s.mamba_heads_per_group
    heads = _first_of_groups(g, h // g, m, p)
    dt = _first_of_groups(g, h // g, m)
    bc = list(range(2 * h * p, 2 * h * p + 2 * g * n))
    return {
        "q_proj.weight": _first_of_groups(cfg.num_kv_heads, r, s.attn_heads_per_group, hd, s.attn_kv_heads),
        "k_proj.weight": list(range(s.attn_kv_heads * hd)),
        "in_proj.weight": heads + [h * p + c for c in heads] + bc + [2 * h * p + 2 * g * n + c for c in dt],
        "conv1d.weight": heads + list(range(h * p, h * p + 2 * g * n)),
        "norm.weight": heads, "A_log": dt,
    }


SUBS = [SubArch(), SubArch(hidden=24, attn_kv_heads=1, attn_heads_per_group=1, mamba_heads_per_group=2),
        SubArch(attn_heads_per_group=1, mamba_heads_per_group=3, ffn=16, moe_ffn=8, experts=2),
        SubArch(hidden=16, attn_kv_heads=2, attn_heads_per_group=2, mamba_heads_per_group=1, layers=(0, 1, 3))]


@pytest.mark.parametrize("sub", SUBS)
def test_layout_rows_match_the_rules_written_out(sub):
    cfg = tiny_hybrid_config()
    s = sub.resolve(cfg)
    ref = _reference_rows(cfg, s)
    v = layout.axis_values(s)
    cuts = {n: layout.cut(d, v) for kind in "*M" for n, d in layout.block_tensors(cfg, kind).items()}
    for name, rows in ref.items():
        runs = cuts[name][0]
        full = sum(seg.size for seg in {**layout.attention_tensors(cfg), **layout.mamba_tensors(cfg)}[name][0])
        got = list(range(full)) if runs is None else [i for a, b in runs for i in range(a, b)]
        assert got == rows, name


@pytest.mark.parametrize("sub", SUBS)
def test_take_equals_indexing_and_the_forward_uses_it(sub):
    """take(t, cut) is plain advanced indexing by the kept rows/columns; the sliced forward is the extracted
    standalone model's forward (the extract reads the same cuts)."""
    torch.manual_seed(0)
    cfg = tiny_hybrid_config()
    model = randomize_(nestlm.Decoder(cfg)).eval()
    s = sub.resolve(cfg)
    sd = model.state_dict()
    for name, (src, c) in layout.model_cuts(cfg, s).items():
        t = sd[src]
        ref = t
        for d, runs in enumerate(c):
            if runs is not None:
                ref = ref.index_select(d, torch.tensor([i for a, b in runs for i in range(a, b)]))
        assert torch.equal(layout.take(t, c), ref), name
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    small = nestlm.Decoder(nestlm.sliced_config(cfg, s))
    small.load_state_dict(sliced_state_dict(model, s))
    with torch.no_grad():
        assert_close(model(ids, sub=s), small(ids), rtol=1e-5, atol=1e-5)


def test_take_gradient_matches_indexing():
    w = torch.randn(12, 10, requires_grad=True)
    c = (((0, 2), (4, 6)), ((0, 7),))
    g = torch.randn(4, 7)
    (layout.take(w, c) * g).sum().backward()
    ref = torch.zeros(12, 10)
    ref[[0, 1, 4, 5], :7] = g
    assert torch.equal(w.grad, ref)


def test_perm_then_prefix_is_the_permuted_prefix():
    """Sorting and slicing share the segments: permuting units then keeping the first k of each group keeps
    exactly the channels of the k first-ranked units of each group."""
    seg = (layout.Seg("mamba", 8, 3, 2), layout.Seg(None, 4), layout.Seg("mamba", 8, 1, 2))
    p = torch.tensor([2, 0, 3, 1, 6, 4, 7, 5])  # within groups
    full = torch.arange(sum(x.size for x in seg))
    moved = full[layout.perm(seg, {"mamba": p})]
    kept = moved[layout.index(layout.dim_runs(seg, {"mamba": 2}), "cpu")]
    units = [2, 0, 6, 4]
    want = [u * 3 + c for u in units for c in range(3)] + list(range(24, 28)) + [28 + u for u in units]
    assert kept.tolist() == want


def test_embed_moves_states_between_widths():
    seg = (layout.Seg("mamba", 4, 2, 2), layout.Seg(None, 3))
    full = torch.arange(11.0)[None]  # [1, 8 head channels + 3 fixed]
    small = full[:, layout.index(layout.dim_runs(seg, {"mamba": 1}), "cpu")]  # heads 0 and 2
    big = layout.embed(small, 1, seg, {"mamba": 1}, {"mamba": 2})
    assert big.tolist() == [[0, 1, 0, 0, 4, 5, 0, 0, 8, 9, 10]]
    assert torch.equal(layout.embed(big, 1, seg, {"mamba": 2}, {"mamba": 1}), small)


def _private_names() -> set[str]:
    """Private methods and attributes the mixers define (model/layers.py)."""
    tree = ast.parse((SRC / "model" / "layers.py").read_text())
    names = set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__"):
                names.add(node.name)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                names.add(node.attr)
    return names - {"_parameters", "_modules", "_buffers"}  # nn.Module's own


def test_nothing_outside_a_mixer_calls_its_privates():
    private = _private_names()
    assert private, "expected the mixers to have private helpers"
    offenders = []
    for f in sorted(SRC.rglob("*.py")):
        if f == SRC / "model" / "layers.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private and not (
                    isinstance(node.value, ast.Name) and node.value.id == "self"):
                offenders.append(f"{f.relative_to(SRC)}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def test_every_state_dict_tensor_is_declared():
    for cfg in (tiny_hybrid_config(), tiny_hybrid_config(attn_bias=True, mamba_bias=True, conv_bias=True,
                                                          qk_norm=True, tie_embeddings=False)):
        sd = nestlm.Decoder(cfg).state_dict()
        assert set(sd) == set(layout.model_tensors(cfg))
        # the full SubArch's standalone model is the model itself: every tensor, block by block as in the
        # state dict, under its own name, nothing cut
        cuts = layout.model_cuts(cfg, SubArch.full(cfg))
        assert set(cuts) == set(sd)
        assert [n.split(".")[:2] for n in cuts] == [n.split(".")[:2] for n in sd]
        for name, (src, c) in cuts.items():
            assert src == name and all(r is None for r in c), (name, src, c)
            assert layout.take(sd[name], c) is sd[name]
