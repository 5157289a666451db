"""Nested submodels of a Nemotron-H-style hybrid Decoder: the sliced forward `model(ids, sub=s)` against the
extracted standalone model, against the exported checkpoint run by plain transformers, and against itself with
a cache."""

from __future__ import annotations

import pytest
import torch
from conftest import num_params, randomize_
from safetensors.torch import load_file
from torch.testing import assert_close

import nestlm
from nestlm import SubArch
from nestlm.model.extract import extract

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"atol": 2e-5, "rtol": 1e-4}
VOCAB = 96

SUBS = {
    "hidden": SubArch(hidden=24),
    "attn-heads-per-group": SubArch(attn_heads_per_group=2),
    "attn-kv-heads": SubArch(attn_kv_heads=1, attn_heads_per_group=3),
    "mamba-heads": SubArch(mamba_heads_per_group=2),
    "ffn": SubArch(ffn=20),
    "experts": SubArch(experts=4),
    "experts-below-top-k": SubArch(experts=1),
    "moe-widths": SubArch(moe_ffn=12, shared_ffn=10),
    "layers": SubArch(layers=(0, 2, 3, 5, 7)),
    "all": SubArch(
        hidden=20,
        attn_kv_heads=1,
        attn_heads_per_group=2,
        mamba_heads_per_group=3,
        ffn=24,
        moe_ffn=8,
        shared_ffn=16,
        experts=3,
        layers=(0, 1, 3, 4, 6),
    ),
}


def make_model(seed=0) -> nestlm.Decoder:
    # 8 query heads in 2 KV groups, 8 Mamba heads in 2 groups, 6 experts top-2 + shared expert; every bias on
    cfg = nestlm.ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        pattern="M*-EM*E-",
        num_heads=8,
        num_kv_heads=2,
        head_dim=4,
        intermediate_size=48,
        mlp_bias=True,
        mamba_heads=8,
        mamba_head_dim=4,
        mamba_groups=2,
        ssm_state=8,
        mamba_bias=True,
        chunk_size=4,
        dt_min=1e-3,
        n_experts=6,
        top_k=2,
        moe_intermediate_size=16,
        shared_intermediate_size=24,
    )
    # randomize_ keeps dt_bias in [-1, 1] so the dt_min clamp never bites
    # (transformers doesn't clamp dt in decoding)
    return randomize_(nestlm.Decoder(cfg), seed).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def ids_(batch=2, t=11, seed=1):
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SUBS))
def test_sliced_forward_equals_extracted_model(model, name):
    s = SUBS[name]
    small = extract(model, s)
    assert small.cfg == nestlm.sliced_config(model.cfg, s)
    assert num_params(small) < num_params(model)
    ids = ids_()
    with torch.no_grad():
        got = model(ids, sub=s)
        ref = small(ids)
    assert got.shape == (2, 11, VOCAB)
    assert_close(got, ref, **TOL)
    # the sliced forward really is a different model
    with torch.no_grad():
        assert not torch.allclose(got, model(ids), atol=1e-3)


# transformers' router takes the top 2 experts of each group: a 1-expert export can't run there (see below)
EXPORTABLE = sorted(n for n in SUBS if n != "experts-below-top-k")


@pytest.mark.parametrize("name", EXPORTABLE + ["odd-moe-ffn"])
def test_exported_submodel_runs_in_transformers(model, name, tmp_path):
    from transformers import AutoModelForCausalLM

    kw = {}
    if name == "odd-moe-ffn":
        # transformers' default grouped_mm experts path on CPU needs 16-byte row strides
        # (fp32: moe_ffn % 4 == 0); its eager experts path runs any width
        s, kw = SubArch(moe_ffn=10, experts=5), {"experts_implementation": "eager"}
    else:
        s = SUBS[name]
    out = nestlm.to_hf(model, tmp_path / name, sub=s)
    hf = AutoModelForCausalLM.from_pretrained(out, **kw).eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    r = s.resolve(model.cfg)
    assert hf.config.hidden_size == r.hidden and len(hf.config.layers_block_type) == len(r.layers)
    ids = ids_(2, 9, seed=2)
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids, sub=s), **TOL)


def test_one_expert_export_is_rejected_clearly(model, tmp_path):
    """experts=1 runs in nestlm (top_k becomes 1), but transformers' NemotronH router always takes topk(2)
    within each expert group and crashes on the exported checkpoint: to_hf must refuse it up front."""
    with pytest.raises(nestlm.UnsupportedArchitecture, match="expert"):
        nestlm.to_hf(model, tmp_path / "one", sub=SUBS["experts-below-top-k"])
    assert not (tmp_path / "one").exists()


@pytest.mark.parametrize("name", sorted(SUBS))
def test_cached_decoding_at_subarch(model, name):
    s = SUBS[name]
    ids, p = ids_(2, 10, seed=3), 5
    with torch.no_grad():
        full = model(ids, sub=s)
        cache = model.new_cache()
        steps = [model(ids[:, :p], sub=s, cache=cache)]
        steps += [model(ids[:, t : t + 1], sub=s, cache=cache) for t in range(p, ids.shape[1])]
    assert cache.sub == s.resolve(model.cfg)
    assert_close(torch.cat(steps, 1), full, **TOL)


@pytest.mark.parametrize(
    ("a", "b"), [("hidden", "all"), ("mamba-heads", "attn-kv-heads"), ("layers", None), (None, "ffn")]
)
def test_cache_bound_to_its_subarch(model, a, b):
    sa, sb = SUBS.get(a), SUBS.get(b)
    ids = ids_(1, 4)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, sub=sa, cache=cache)
        with pytest.raises(ValueError, match="another SubArch"):
            model(ids[:, :1], sub=sb, cache=cache)
        # the same SubArch, spelled differently (resolved), is still accepted
        model(ids[:, :1], sub=sa.resolve(model.cfg) if sa is not None else SubArch(), cache=cache)
    assert cache.pos == 5


def test_full_subarch_is_the_full_model(model, tmp_path):
    cfg = model.cfg
    ids = ids_()
    with torch.no_grad():
        ref = model(ids)
        for s in (SubArch(), SubArch.full(cfg), SubArch(hidden=32, experts=6, layers=tuple(range(8)))):
            assert s.resolve(cfg) == SubArch.full(cfg)
            assert torch.equal(model(ids, sub=s), ref)
        full = extract(model, SubArch.full(cfg))
        assert full.cfg == cfg
        assert torch.equal(full(ids), ref)
    sd, ref_sd = full.state_dict(), model.state_dict()
    assert set(sd) == set(ref_sd)
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    a = load_file(nestlm.to_hf(model, tmp_path / "a") / "model.safetensors")
    b = load_file(nestlm.to_hf(model, tmp_path / "b", sub=SubArch.full(cfg)) / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_nested_submodels_are_prefixes(model):
    """Slicing twice (a sub-submodel of the extracted submodel) equals slicing once."""
    outer = SubArch(hidden=28, attn_heads_per_group=3, mamba_heads_per_group=3, ffn=40, moe_ffn=12, experts=5)
    inner = SubArch(hidden=20, attn_heads_per_group=2, mamba_heads_per_group=2, ffn=24, moe_ffn=8, experts=3)
    mid = extract(model, outer)
    ids = ids_()
    with torch.no_grad():
        assert_close(mid(ids, sub=inner), model(ids, sub=inner), **TOL)
