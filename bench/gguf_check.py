"""llama.cpp and transformers 4 / 5 read nestlm's exports (issue 26). Run by hand, not in CI.

For each case (SmolLM2-135M and a zero-shot slice of it; random nemotron_h hybrids with Mamba, attention and
dense MLP or MoE blocks, and slices of them; the patterns llama.cpp cannot load) it writes the folder with
nestlm (to_hf / slice), converts it with llama.cpp's own converter (convert_hf_to_gguf.py under transformers
4.57, which is what it pins), runs the GGUF in llama.cpp (the python binding of the same sdist over the
libllama built from it, fp32 KV cache) and compares, on the same prompt ids, the logits and 8 greedy tokens
against transformers 5 on the folder; transformers 4.57 loads the folder too (tokenizer always, the model
where 4.57 has the architecture: it has no nemotron_h). Without --lib it reads the GGUF back with the gguf
package and compares every tensor with the folder's instead of running it.

Setup (once, ~10 minutes on 2 cores; nothing else is downloaded):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python -m venv /tmp/venv-t4        # plain: it must not see transformers 5
    /tmp/venv-t4/bin/pip install torch==2.13.0 "transformers==4.57.*" sentencepiece protobuf numpy diskcache
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcpp-build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DGGML_OPENMP=OFF
    cmake --build /tmp/lcpp-build --target llama -j 2

    PYTHONPATH=src python bench/gguf_check.py --sdist llama_cpp_python-0.3.36 --t4-python /tmp/venv-t4/bin/python \\
        --lib /tmp/lcpp-build/bin

Prints one markdown table. A case llama.cpp is expected to refuse says so; a process that aborts (llama.cpp's
GGML_ASSERT) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is Paris. The capital of Germany is"
NEW = 8


# ---------------------------------------------------------------------------------------------- workers
def worker_t4(folder: str, ids: list[int], out: str) -> None:
    """Under transformers 4.57: the tokenizer's ids of PROMPT and, when 4.57 knows the architecture, logits."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    res = {"version": transformers.__version__}
    tok = AutoTokenizer.from_pretrained(folder)
    res["tokenizer_class"] = type(tok).__name__
    res["ids"] = tok(PROMPT, add_special_tokens=False)["input_ids"]
    try:
        AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        res["model"] = f"no architecture: {str(e).splitlines()[0][:80]}"
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            np.save(out + ".npy", model(torch.tensor([ids])).logits[0].numpy())
        res["model"] = "ok"
    Path(out).write_text(json.dumps(res))


def worker_llama(gguf: str, ids: list[int], out: str) -> None:
    """In llama.cpp (fp32 KV cache): logits of `ids`, NEW greedy tokens, and its tokenizer's ids of PROMPT."""
    import numpy as np
    from llama_cpp import Llama, llama_cpp

    llm = Llama(model_path=gguf, n_ctx=128, logits_all=True, n_threads=2, verbose=False,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)])
    greedy = []
    for _ in range(NEW):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(t)
        llm.eval([t])
    np.save(out + ".npy", logits)
    Path(out).write_text(json.dumps({"greedy": greedy, "ids": llm.tokenize(PROMPT.encode(), add_bos=False,
                                                                            special=False)}))


def worker_readback(gguf: str, folder: str, out: str) -> None:
    """Without a built llama.cpp: every GGUF tensor's element count and the file's metadata keys."""
    from gguf import GGUFReader

    r = GGUFReader(gguf)
    Path(out).write_text(json.dumps({"tensors": len(r.tensors), "elements": int(sum(int(t.n_elements)
                                                                                      for t in r.tensors)),
                                     "arch": str(r.fields["general.architecture"].contents())}))


# ---------------------------------------------------------------------------------------------- cases
def nemotron_h(pattern: str, vocab: int):
    import nestlm

    return nestlm.ModelConfig(family="nemotron_h", vocab_size=vocab, hidden_size=128, pattern=pattern,
                              num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=None, intermediate_size=256,
                              mlp_act="relu2", mamba_heads=8, mamba_head_dim=16, mamba_groups=2, ssm_state=16,
                              chunk_size=16, n_experts=8, top_k=2, moe_intermediate_size=64,
                              shared_intermediate_size=128)


def decoder(family: str, vocab: int):
    """A tiny random Llama / Qwen3 / Qwen3-MoE / Mixtral (2 layers; MoE families: 4 experts, top 2)."""
    import nestlm

    moe = family in ("qwen3_moe", "mixtral")
    return nestlm.ModelConfig(family=family, vocab_size=vocab, hidden_size=128, pattern="*E*E" if moe else "*-*-",
                              num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=100000.0, mlp_act="swiglu",
                              intermediate_size=256, qk_norm=family.startswith("qwen3"), n_experts=4, top_k=2,
                              moe_intermediate_size=64, moe_router="softmax", moe_act="swiglu",
                              norm_topk_prob=True, tie_embeddings=family == "llama")


def build_cases(root: Path, smollm2: Path, quick: bool) -> list[dict]:
    """Folders to check: {name, folder, expect} (expect: 'ok' or why llama.cpp can't load it)."""
    import torch

    import nestlm
    from nestlm.io.safetensors import copy_files
    from nestlm.io.tokenizer import TOKENIZER_FILES
    from nestlm.slicing import slice as slice_folder

    cases, dense = [], None
    if not quick:
        cases.append({"name": "SmolLM2-135M (nestlm.to_hf of nestlm.from_hf)", "expect": "ok",
                      "folder": nestlm.to_hf(nestlm.from_hf(smollm2), root / "smollm2")})
        cut = nestlm.SubArch(ffn=1024, attn_heads_per_group=2)
        cases.append({"name": "SmolLM2-135M slice (ffn 1024, 6 of 9 heads)",
                      "folder": slice_folder(smollm2, cut, root / "smollm2-slice"), "expect": "ok"})
    vocab = 49152  # SmolLM2's tokenizer (the converter must know the tokenizer's pre-tokenizer)
    for family in ("qwen3", "qwen3_moe", "mixtral"):
        torch.manual_seed(0)
        f = nestlm.to_hf(nestlm.Decoder(decoder(family, vocab)), root / family)
        copy_files(smollm2, f, TOKENIZER_FILES)
        cases.append({"name": f"{family} (tiny, random)", "folder": f, "expect": "ok"})
    cuts = {"M*-M-*-": nestlm.SubArch(hidden=96, mamba_heads_per_group=2, ffn=128),
            "M*EME*E": nestlm.SubArch(hidden=96, mamba_heads_per_group=2, experts=4, moe_ffn=32)}
    for pattern, sub in cuts.items():
        torch.manual_seed(0)
        kind = "MoE" if "E" in pattern else "dense MLP"
        f = nestlm.to_hf(nestlm.Decoder(nemotron_h(pattern, vocab)), root / f"nh-{pattern}")
        copy_files(smollm2, f, TOKENIZER_FILES)
        dense = f if "E" not in pattern else dense
        cases.append({"name": f"nemotron_h {pattern} ({kind})", "folder": f, "expect": "ok"})
        cases.append({"name": f"nemotron_h {pattern} slice", "folder": slice_folder(f, sub, root / f"nh-{pattern}-cut"),
                      "expect": "ok"})
    # what llama.cpp can't load: dense and MoE blocks mixed; and (before the fix) MoE keys on a dense model
    torch.manual_seed(0)
    f = nestlm.to_hf(nestlm.Decoder(nemotron_h("M*-E", vocab)), root / "nh-mixed")
    copy_files(smollm2, f, TOKENIZER_FILES)
    cases.append({"name": "nemotron_h M*-E (mixed)", "folder": f, "expect": "refused: mixes '-' and 'E'"})
    old = root / "nh-placeholders"
    old.mkdir()
    for p in dense.iterdir():  # the dense model, with the old placeholder keys
        (old / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(cfg | {  # what nestlm wrote before issue 26 (+ n_shared_experts)
        "n_routed_experts": 1, "num_experts_per_tok": 1, "moe_intermediate_size": 1, "n_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0}))
    cases.append({"name": "nemotron_h M*-M-*- with the old placeholder MoE keys", "folder": old,
                  "expect": "refused: MoE keys on a dense model (before the fix)"})
    return cases


# ---------------------------------------------------------------------------------------------- driver
def run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> tuple[int, str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    tail = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
    return r.returncode, (tail[-1] if tail else "")


def hf5(folder: Path):
    """transformers 5 on the folder: (prompt ids, logits [t, V] fp32, NEW greedy ids by full recompute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seq = list(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        for _ in range(NEW):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return ids, logits.numpy(), seq[len(ids):]


def check(case: dict, args, work: Path) -> dict:
    import numpy as np

    folder, row = Path(case["folder"]), {"case": case["name"], "expect": case["expect"]}
    ids, ref, greedy = hf5(folder)
    t4 = work / "t4.json"
    code, last = run([args.t4_python, __file__, "--worker", "t4", str(folder), json.dumps(ids), str(t4)])
    if code == 0:
        r4 = json.loads(t4.read_text())
        row["t4"] = f"tokenizer {'same ids' if r4['ids'] == ids else 'DIFFERENT ids'}"
        if r4["model"] == "ok":
            row["t4"] += f", logits max abs Δ {np.abs(np.load(str(t4) + '.npy') - ref).max():.1e}"
        else:
            row["t4"] += ", model: no nemotron_h in 4.57"
    else:
        row["t4"] = f"FAILED: {last[:90]}"
    gguf = work / "model.gguf"
    sdist = Path(args.sdist)
    conv = sdist / "vendor" / "llama.cpp"
    t0 = time.perf_counter()
    code, last = run([args.t4_python, str(conv / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(gguf),
                      "--outtype", "f32"], env={"PYTHONPATH": str(conv / "gguf-py"), "NO_LOCAL_GGUF": ""})
    row["convert"] = f"ok ({time.perf_counter() - t0:.0f} s)" if code == 0 else f"FAILED: {last[:90]}"
    if code != 0:
        return row
    out = work / "llama.json"
    if args.lib:
        code, last = run([args.t4_python, __file__, "--worker", "llama", str(gguf), json.dumps(ids), str(out)],
                         env={"LLAMA_CPP_LIB_PATH": args.lib, "PYTHONPATH": str(sdist)})
        if code != 0:
            why = last.replace(str(gguf), "the GGUF")[:90] or "(GGML_ASSERT, no message)"
            row["llama.cpp"] = f"{'ABORTED' if code < 0 else 'FAILED'} ({code}): {why}"
            return row
        rl = json.loads(out.read_text())
        diff = np.abs(np.load(str(out) + ".npy")[:, :ref.shape[1]] - ref).max()
        row["llama.cpp"] = (f"logits max abs Δ {diff:.1e}, greedy {'same' if rl['greedy'] == greedy else 'DIFFERENT'}"
                            f" ({NEW} tokens), tokenizer {'same' if rl['ids'] == ids else 'DIFFERENT'}")
    else:
        code, last = run([args.t4_python, __file__, "--worker", "readback", str(gguf), str(folder), str(out)],
                         env={"PYTHONPATH": str(conv / "gguf-py")})
        row["llama.cpp"] = f"not run (no --lib); read back: {out.read_text() if code == 0 else last[:80]}"
    gguf.unlink(missing_ok=True)
    return row


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", required=True, help="the unpacked llama-cpp-python 0.3.36 sdist folder")
    ap.add_argument("--t4-python", required=True, help="python of a venv with transformers 4.57 (and torch)")
    ap.add_argument("--lib", default=None, help="folder of libllama.so built from the sdist's llama.cpp")
    ap.add_argument("--quick", action="store_true", help="the nemotron_h cases only (no SmolLM2-135M)")
    args = ap.parse_args(argv)
    from nestlm.data.pretrained import smollm2_135m_dir

    smollm2 = smollm2_135m_dir()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for case in build_cases(Path(d), smollm2, args.quick):
            work = Path(d) / "work"
            work.mkdir(exist_ok=True)
            rows.append(check(case, args, work))
            print(rows[-1], file=sys.stderr, flush=True)
    cols = ["case", "expect", "convert", "llama.cpp", "t4"]
    head = ["case", "expected in llama.cpp", "convert_hf_to_gguf (transformers 4.57)",
            "llama.cpp vs transformers 5", "transformers 4.57 vs 5"]
    out = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                    ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows])
    print(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "readback":
            worker_readback(*rest)
        else:
            {"t4": worker_t4, "llama": worker_llama}[kind](rest[0], json.loads(rest[1]), rest[2])
    else:
        main()
