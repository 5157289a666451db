"""Shared test helpers: tiny random configs in transformers, and a randomizer that makes every weight
matter (HF's init leaves norms at 1 and blocks near zero, which would hide bugs)."""

from __future__ import annotations

import json
import math
import socket
import warnings
from pathlib import Path

import pytest
import torch

import nestlm

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")

# The test models are tiny: one intra-op thread is fastest, and on a shared 2-core machine torch's thread
# pool spinning can turn a 7 ms forward into a 1 s one. Benchmarks (bench/) use the real thread count.
torch.set_num_threads(1)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and buffer of an HF or nestlm model a value that exercises it."""
    g = torch.Generator().manual_seed(seed)

    def rn(t, std=1.0):
        return torch.randn(t.shape, generator=g) * std

    for n, p in sorted(list(model.named_parameters()) + list(model.named_buffers())):
        if not p.is_floating_point() or "inv_freq" in n:
            continue
        if n.endswith(("norm.weight", "norm_f.weight", "layernorm.weight")):
            v = 1 + rn(p, 0.2)
        elif "A_log" in n:
            v = torch.rand(p.shape, generator=g) * 1.5
        elif "dt_bias" in n:
            v = torch.rand(p.shape, generator=g) * 2 - 1
        elif n.endswith(".D"):
            v = rn(p)
        elif "e_score_correction_bias" in n:
            v = rn(p, 0.1)
        elif p.dim() >= 2:
            v = rn(p, 1 / math.sqrt(p.shape[-1]))
        else:
            v = rn(p, 0.1)
        p.copy_(v.to(p.dtype))
    return model


def random_hf_model(make, over: dict, seed: int = 0):
    """A transformers model of the config `make(**over)`, every weight randomized (randomize_), fp32, eval."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return randomize_(AutoModelForCausalLM.from_config(make(**over), dtype=torch.float32), seed=seed).eval()


def saved_hf_pair(make, over: dict, folder):
    """(random HF model, the folder it is saved in, our model loaded from that folder)."""
    hf = random_hf_model(make, over)
    hf.save_pretrained(folder)
    return hf, folder, nestlm.from_hf(folder)


def onehots(router, idx: dict) -> dict:
    """{axis: one-hot weights} of the choice indices idx {axis: index}."""
    return {ax: torch.nn.functional.one_hot(torch.tensor(i), len(router.choices[ax])).float() for ax, i in idx.items()}


def tiny_ids(b=2, t=12, seed=0, vocab=64) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def token_stream(n=4000, seed=0) -> torch.Tensor:
    """Random tokens of the tiny models' 64-token vocabulary: training data for tiny elastify runs."""
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def num_params(model: torch.nn.Module) -> int:
    """Every stored number of a model: its parameters, plus MoE routers' correction-bias buffers (a
    reference for nestlm.count_params, counted from the module itself)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


def relative_deviation(router, budget_idx: int) -> torch.Tensor:
    """|cost / budget - 1| of every combination of the router's choices (one dimension per axis)."""
    return (router.combo_costs() / router.budgets[budget_idx] - 1).abs()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (a test server's, or a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(d: Path) -> dict:
    """Every path under `d` with its bytes (None for a folder): equal snapshots, a byte-identical tree."""
    return {p.relative_to(d): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one process: elastify takes its distributed path (DDP, DCP checkpoints)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def train_log(out) -> list[dict]:
    """The records of an elastify run's out/train/log.jsonl (the file must exist)."""
    return [json.loads(ln) for ln in (out / "train" / "log.jsonl").read_text().splitlines()]


def tiny_run_config(choices: dict, **over):
    """The tiny elastify runs' ElasticConfig: three budgets, a fast router, 60 steps of 4 x 16 tokens, the
    library's defaults otherwise (each step trains every budget on its batch; a cosine lr after a warmup)."""
    kw = dict(budgets=[1.0, 0.75, 0.64], choices=choices, align=4, steps=60, batch=4, seq_len=16,
              lr_model=1e-3, lr_router=0.03, router_weight=2.0, router_hidden=32, p_full=0.2,
              checkpoint_every=1000, calib_batches=2, seed=0)
    kw.update(over)
    return nestlm.ElasticConfig(**kw)


def tiny_hybrid_config(**over) -> nestlm.ModelConfig:
    """Our own tiny hybrid (Mamba2 with 2 groups, GQA attention, MLP, MoE with a shared expert): pattern
    "M*-E" and a 64-token vocabulary unless overridden."""
    kw = dict(vocab_size=64, hidden_size=32, pattern="M*-E", num_heads=4, num_kv_heads=2, head_dim=8,
              intermediate_size=48, mamba_heads=8, mamba_head_dim=4, mamba_groups=2, ssm_state=8, chunk_size=4,
              n_experts=4, top_k=2, moe_intermediate_size=16, shared_intermediate_size=24)
    kw.update(over)
    return nestlm.ModelConfig(**kw)


@torch.no_grad()
def hf_cached(hf, ids, p):
    """HF logits for a prefill of ids[:, :p] then one token at a time through its own cache."""
    out = hf(ids[:, :p], use_cache=True)
    logits, past = [out.logits], out.past_key_values
    for t in range(p, ids.shape[1]):
        out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return torch.cat(logits, 1)


@torch.no_grad()
def ours_cached(model, ids, p, sub=None):
    """Our logits for a prefill of ids[:, :p] then one token at a time through our cache."""
    cache = model.new_cache()
    logits = [model(ids[:, :p], sub=sub, cache=cache)]
    for t in range(p, ids.shape[1]):
        logits.append(model(ids[:, t:t + 1], sub=sub, cache=cache))
    assert cache.pos == ids.shape[1]
    return torch.cat(logits, 1)


def tiny_nemotron_h_config(**over):
    from transformers import NemotronHConfig

    kw = dict(vocab_size=96, hidden_size=32, layers_block_type=["linear_attention", "moe", "full_attention",
              "mlp", "linear_attention", "moe"], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=48, ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=4, n_groups=2,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=24, chunk_size=4, conv_kernel=4)
    kw.update(over)
    return NemotronHConfig(**kw)


def tiny_llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=128,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    kw.update(over)
    return LlamaConfig(**kw)


def tiny_qwen3_config(**over):
    from transformers import Qwen3Config

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=128,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)
    kw.update(over)
    return Qwen3Config(**kw)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one intra-op thread: with 2 cores shared by other processes, torch's
    thread pool spins and a 1 ms forward can take 0.5 s. Restores the previous setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_round_trip_exact(hf, src_dir, ours, out_dir, ids):
    """`to_hf` of a model read from `src_dir` rewrites the same tensors bit for bit, transformers loads the
    result as the same class with identical logits, and nestlm reads it back to the same config."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import nestlm

    out = nestlm.to_hf(ours, out_dir)
    a, b = load_file(src_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((out / "config.json").read_text())["model_type"] == hf.config.model_type
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    assert nestlm.from_hf(out).cfg == ours.cfg


@pytest.fixture(scope="session")
def cli_world(tmp_path_factory):
    """The folders of tests/cli_world.py (parent, text, elastic, slice, packed), built once per session for the
    careless-user tests (test_careless.py, test_cli_errors.py); tests that damage them work on a copy."""
    from cli_world import make_world

    return make_world(tmp_path_factory.mktemp("cli_world"))
