"""What each reader of nestlm's exports needs, written down as data, and every export pinned against it.

Readers (issue 26): llama.cpp's converter (convert_hf_to_gguf.py of the llama-cpp-python 0.3.36 sdist, which
runs under transformers 4.57 and, for nemotron_h, reads config.json as plain JSON because 4.57 has no
nemotron_h), transformers 5 (NemotronHConfig, AutoTokenizer) and transformers 4.57 (AutoTokenizer: the
converter loads the tokenizer with it). The by-hand check that runs the real readers is bench/gguf_check.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_world import run
from conftest import randomize_, tiny_hybrid_config

import nestlm
from nestlm.convert.nemotron_h import TYPE_TO_PATTERN, config_to_hf, llama_cpp_problem
from nestlm.data import ByteTokenizer

# llama.cpp, conversion/nemotron.py NemotronHModel + conversion/granite.py GraniteHybridModel (0.3.36 sdist):
# the keys it indexes or find_hparam()s for a nemotron_h. `num_experts_per_tok` present = "MoE" (then every
# feed-forward block is built as MoE; a dense model with it aborts in llama.cpp's loader).
LLAMA_CPP_NEMOTRON_H = {
    "always": {"architectures", "vocab_size", "hidden_size", "layer_norm_epsilon", "num_attention_heads",
               "num_key_value_heads", "head_dim", "mamba_num_heads", "mamba_head_dim", "n_groups", "conv_kernel",
               "ssm_state_size", "hybrid_override_pattern"},
    # dense '-' blocks are found only in the string pattern (its list form counts only "moe" blocks)
    "dense": {"intermediate_size"},
    "moe": {"num_experts_per_tok", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
            "moe_shared_expert_intermediate_size", "norm_topk_prob", "routed_scaling_factor", "n_group"},
    "forbidden_without_moe": {"num_experts_per_tok"},
}
# transformers 5 NemotronHConfig: the list it writes (and prefers), and the layer types it accepts
TRANSFORMERS5_NEMOTRON_H = {"layers_block_type": {"linear_attention", "full_attention", "moe", "mlp"}}
# transformers 4.57 LlamaConfig / Qwen3Config / MixtralConfig: RoPE's base is the top-level `rope_theta` (it
# ignores transformers 5's rope_parameters and would silently use 10000)
TRANSFORMERS4_DECODER = {"rope_theta", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "head_dim", "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "vocab_size",
                         "hidden_size", "hidden_act"}
# tokenizer classes transformers 4.57's AutoTokenizer cannot resolve (a transformers 5 name)
TRANSFORMERS4_UNKNOWN_TOKENIZER_CLASSES = {"TokenizersBackend"}

PATTERNS = {"dense": "M*-M-", "moe": "M*EME", "mixed": "M*-E"}


def _cfg(pattern: str) -> nestlm.ModelConfig:
    return tiny_hybrid_config(pattern=pattern, family="nemotron_h", mlp_act="relu2", rope_theta=None)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_nemotron_h_config_has_what_llama_cpp_and_transformers5_read(kind):
    hf = config_to_hf(_cfg(PATTERNS[kind]))
    need = LLAMA_CPP_NEMOTRON_H["always"] | LLAMA_CPP_NEMOTRON_H[kind]
    assert need <= hf.keys(), need - hf.keys()
    if kind == "dense":
        assert not LLAMA_CPP_NEMOTRON_H["forbidden_without_moe"] & hf.keys()
        assert not {k for k in hf if "expert" in k or k in ("n_group", "topk_group")}  # no MoE placeholders
    else:
        assert hf["n_shared_experts"] == 1 and hf["n_routed_experts"] == 4 and hf["num_experts_per_tok"] == 2
    assert hf["hybrid_override_pattern"] == PATTERNS[kind]
    assert set(hf["layers_block_type"]) <= TRANSFORMERS5_NEMOTRON_H["layers_block_type"]
    assert "".join(TYPE_TO_PATTERN[t] for t in hf["layers_block_type"]) == PATTERNS[kind]
    assert hf["num_hidden_layers"] == len(PATTERNS[kind])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_transformers5_reads_the_written_nemotron_h(kind, tmp_path):
    """transformers 5 builds the same blocks from a config carrying both spellings, and its logits match."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = randomize_(nestlm.Decoder(_cfg(PATTERNS[kind]))).eval()
    out = nestlm.to_hf(model, tmp_path / kind)
    c = AutoConfig.from_pretrained(out)
    assert c.hybrid_override_pattern == PATTERNS[kind]
    if kind == "moe":
        assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (4, 2, 1)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
def test_decoder_configs_have_what_transformers4_reads(family):
    from nestlm.convert import FAMILIES

    pattern = "*E*E" if family == "mixtral" else "*-*-"
    over = dict(pattern=pattern, family=family, mlp_act="swiglu", rope_theta=123456.0, qk_norm=family == "qwen3",
                shared_intermediate_size=0, moe_router="softmax", moe_act="swiglu")
    hf = FAMILIES[family].config_to_hf(tiny_hybrid_config(**over))
    assert TRANSFORMERS4_DECODER <= hf.keys(), TRANSFORMERS4_DECODER - hf.keys()
    assert hf["rope_theta"] == hf["rope_parameters"]["rope_theta"] == 123456.0


def test_tokenizer_config_loads_in_transformers_4_and_5(tmp_path):
    """Every tokenizer folder nestlm writes names a class both majors have; transformers 5 loads it as is."""
    from transformers import AutoTokenizer

    ByteTokenizer().save(tmp_path / "tok")
    d = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert d["tokenizer_class"] not in TRANSFORMERS4_UNKNOWN_TOKENIZER_CLASSES
    assert d["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok("In <eos>")["input_ids"] == [*b"In ", ByteTokenizer().eos_id]


def test_copied_tokenizer_configs_are_made_portable(tmp_path):
    """A parent folder saved by transformers 5 (TokenizersBackend) gives exports transformers 4 can read."""
    torch.manual_seed(0)
    src = nestlm.to_hf(nestlm.Decoder(_cfg("M*EM")), tmp_path / "src")
    ByteTokenizer().hf_tokenizer().save_pretrained(src)  # transformers 5's own files, untouched
    assert json.loads((src / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    code, _, err = run(["slice", src, "--sub", "hidden=16", "-o", tmp_path / "cut"])
    assert code == 0, err
    d = json.loads((tmp_path / "cut" / "tokenizer_config.json").read_text())
    assert d["tokenizer_class"] not in TRANSFORMERS4_UNKNOWN_TOKENIZER_CLASSES


def test_slice_warns_once_when_llama_cpp_cannot_load_the_pattern(tmp_path):
    torch.manual_seed(0)
    for kind in ("mixed", "moe"):
        src = nestlm.to_hf(nestlm.Decoder(_cfg(PATTERNS[kind])), tmp_path / kind)
        code, _, err = run(["slice", src, "--sub", "hidden=16", "-o", tmp_path / f"{kind}-cut"])
        assert code == 0, err
        lines = [ln for ln in err.splitlines() if "llama.cpp" in ln]
        assert len(lines) == (1 if kind == "mixed" else 0), err
    assert llama_cpp_problem("M*-E") and llama_cpp_problem("M*E") is None and llama_cpp_problem("M*-") is None


def test_portable_tokenizer_config_rewrites_only_the_transformers5_class(tmp_path):
    from nestlm.data import portable_tokenizer_config

    ByteTokenizer().hf_tokenizer().save_pretrained(tmp_path)
    f = tmp_path / "tokenizer_config.json"
    before = json.loads(f.read_text())
    portable_tokenizer_config(tmp_path)
    after = json.loads(f.read_text())
    assert after == before | {"tokenizer_class": "PreTrainedTokenizerFast"}  # nothing else changed
    f.write_text(json.dumps(after | {"tokenizer_class": "LlamaTokenizerFast"}))
    text = f.read_text()
    portable_tokenizer_config(tmp_path)  # a class transformers 4 has: left as it is
    assert f.read_text() == text
    portable_tokenizer_config(tmp_path / "missing")  # no folder, no file: nothing to do
