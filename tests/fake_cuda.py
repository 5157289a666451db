"""Fake CUDA on a CPU-only torch: run nestlm's CUDA paths without a GPU and catch every CPU tensor in them.

torch's FakeTensorMode gives tensors a device and shapes but no data; any op that meets a CPU tensor (other
than a 0-dim scalar, as on a real GPU) raises FakeTensorDeviceMismatchError. On a CPU-only build two things
are missing for training: a CUDA device guard (autograd asks for one) and CUDA "hooks" (the autograd engine
asks whether an accelerator exists). LIB_SRC registers no-op versions of both; it is compiled once with the
system C++ compiler into ~/.cache/nestlm/fake_cuda/ and must be loaded before torch is imported, so the
scenarios run in a subprocess:

    python tests/fake_cuda.py train slice generate two_phase bug   # -> one JSON line of results

Host syncs are counted by a dispatch mode (SyncCounter): every aten._local_scalar_dense (item, float, int,
bool, tolist), nonzero and device-to-host copy, with the nestlm function that asked for it. Data-dependent
results get stand-in values (1 / True) so that the code runs on.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB_SRC = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
// a CUDA device guard and CUDA hooks that do nothing: enough for autograd on fake CUDA tensors
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
namespace fakecuda {
struct CUDAHooks : public at::CUDAHooksInterface {
  CUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isAvailable() const override { return true; }
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
};
}
namespace at {
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, fakecuda::CUDAHooks);
}
"""


def library() -> Path | str:
    """The compiled fake-CUDA library (built on first use), or a one-line reason why it can't be had."""
    spec = importlib.util.find_spec("torch")
    torch_dir = Path(spec.origin).parent
    version = (torch_dir / "version.py").read_text()
    if "cuda: Optional[str] = None" not in version and "cuda = None" not in version.replace("'", ""):
        return "torch is a CUDA build here: run the real thing"
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return "no C++ compiler (g++) to build the fake CUDA guard"
    key = hashlib.sha256((LIB_SRC + version).encode()).hexdigest()[:16]
    out = Path(os.environ.get("NESTLM_CACHE", Path.home() / ".cache" / "nestlm")) / "fake_cuda" / f"lib{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(f".{os.getpid()}.cpp")
    src.write_text(LIB_SRC)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-O0", "-shared", "-fPIC", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=1", f"-I{torch_dir}/include",
           str(src), "-o", str(tmp), f"-L{torch_dir}/lib", f"-Wl,-rpath,{torch_dir}/lib", "-lc10", "-ltorch_cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    src.unlink(missing_ok=True)
    if r.returncode:
        tmp.unlink(missing_ok=True)
        return f"building the fake CUDA guard failed: {r.stderr.strip().splitlines()[-1:]}"
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------ in the subprocess
def _activate(lib: Path) -> None:
    assert "torch" not in sys.modules, "the fake CUDA library must load before torch"
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _nestlm_site() -> str:
    """file:function of the innermost nestlm frame of the current stack (who asked for the sync)."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}nestlm{os.sep}" in fr.filename:
            return f"{fr.filename.split(os.sep + 'nestlm' + os.sep)[-1]}:{fr.lineno}:{fr.name}"
    return "?"


def sync_counter():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class SyncCounter(TorchDispatchMode):
        """Records every host sync (the nestlm function that asked) and stands in for its data."""

        def __init__(self):
            super().__init__()
            self.syncs: list[str] = []
            self.truth = True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            on_cuda = x is not None and x.device.type == "cuda"
            if func is aten._local_scalar_dense.default:  # CPU ones too: fake CPU tensors have no data either
                if on_cuda:
                    self.syncs.append(_nestlm_site())
                return self.truth if x.dtype == torch.bool else 1 if not x.is_floating_point() else 1.0
            if func is aten.nonzero.default:
                if on_cuda:
                    self.syncs.append(_nestlm_site())
                return torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)
            if func is aten.bincount.default:  # its length depends on the data: minlength (ids below it)
                n = int(kwargs.get("minlength", args[2] if len(args) > 2 else 0)) or x.numel()
                return torch.zeros(n, dtype=torch.long, device=x.device)
            if func is aten._to_copy.default and on_cuda and kwargs.get("device") is not None \
                    and torch.device(kwargs["device"]).type == "cpu":
                self.syncs.append(_nestlm_site())
            return func(*args, **kwargs)

    return SyncCounter()


_MODE = None


@contextlib.contextmanager
def fake_cuda(truth: bool = True):
    """FakeTensorMode with CUDA reported available (one bf16 card); yields the SyncCounter. truth: what a
    data-dependent bool reads as (True: checks pass; False: "all rows stopped?" says no, loops run on)."""
    import torch
    from torch._subclasses import fake_tensor

    patches = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
               "is_bf16_supported": lambda *a, **k: True, "get_device_name": lambda *a, **k: "fake CUDA",
               "synchronize": lambda *a, **k: None, "set_device": lambda *a, **k: None,
               "empty_cache": lambda: None}
    old = {k: getattr(torch.cuda, k) for k in patches}
    old_avoid = fake_tensor.FakeTensorMode.avoid_device_init
    for k, v in patches.items():
        setattr(torch.cuda, k, v)
    fake_tensor.FakeTensorMode.avoid_device_init = property(lambda self: True)  # no real CUDA behind it
    swap = torch.utils.swap_tensors

    def swap_or_set(t1, t2):  # module.to() swaps fake parameters, which the fake mode's weakrefs forbid
        try:
            return swap(t1, t2)
        except RuntimeError:
            with torch.no_grad():
                t1.data = t2.data
            t1.fake_device = t2.fake_device

    torch.utils.swap_tensors = swap_or_set
    tolist = fake_tensor.FakeTensor.tolist

    def fake_tolist(t):  # one sync per call (not per element), stand-in values like item()'s
        if t.device.type == "cuda":
            counter.syncs.append(_nestlm_site())
        one = counter.truth if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0

        def nest(shape):
            return one if not shape else [nest(shape[1:]) for _ in range(shape[0])]

        return nest(list(t.shape))

    fake_tensor.FakeTensor.tolist = fake_tolist
    generator, inference_mode = torch.Generator, torch.inference_mode

    class CardGenerator(generator):  # a CPU generator stands in for the card's (CPU-only builds have none)
        def __new__(cls, device="cpu"):
            return generator.__new__(cls, "cpu") if torch.device(device).type == "cuda" else generator(device)

        def __init__(self, device="cpu"):
            pass

    torch.Generator = CardGenerator
    # the fake mode can't make tensors on the card in inference mode: no_grad stands in for it
    torch.inference_mode = lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext()
    counter = sync_counter()
    counter.truth = truth
    try:
        global _MODE  # one mode for the process: tensors cached across calls (index tensors) stay its own
        _MODE = _MODE or fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
        with _MODE, counter:
            yield counter
    finally:
        for k, v in old.items():
            setattr(torch.cuda, k, v)
        fake_tensor.FakeTensorMode.avoid_device_init = old_avoid
        torch.utils.swap_tensors = swap
        fake_tensor.FakeTensor.tolist = tolist
        torch.Generator, torch.inference_mode = generator, inference_mode


def _tiny(pattern="M*-E", **over):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_hybrid_config

    return tiny_hybrid_config(pattern=pattern, **over)


def scenario_train(tmp: Path) -> dict:
    """nestlm.elastify, one step on cuda in bf16 (autocast, router, budget loss, both AdamW steps)."""
    import torch

    import nestlm
    from nestlm.elastic import checkpoint

    saved = []
    checkpoint.save_pt = lambda path, obj: saved.append(path)  # fake tensors have no bytes to write
    ecfg = nestlm.ElasticConfig(budgets=[1.0, 0.5], choices={"hidden": [1.0, 0.5], "ffn": [1.0, 0.5],
                                                              "mamba_heads_per_group": [1.0, 0.5]},
                                align=4, steps=4, batch=2, seq_len=8, router_hidden=8, sort=False,
                                checkpoint_every=1000, p_full=0.0, seed=0)
    data = torch.randint(0, 64, (400,))
    with fake_cuda() as c:
        parent = nestlm.Decoder(_tiny())  # built in the fake mode on the CPU: elastify moves it to the device
        marks = []  # the syncs so far at each step's log record: between two records lies one whole step
        nestlm.elastify(ecfg, parent, data, tmp / "elastic", max_steps=2, progress=False, device="cuda",
                        dtype="bf16", on_step=lambda rec: marks.append(len(c.syncs)))
    return {"syncs_in_step": c.syncs[marks[0]:marks[1]], "steps": len(marks),
            "checkpoints": [str(p) for p in saved]}


def _model_on_cuda():
    """A tiny hybrid (Mamba2, attention, MLP, MoE) built on the CPU and moved to the fake card, eval mode."""
    import nestlm

    return nestlm.Decoder(_tiny()).to("cuda").eval()


SMALL = dict(hidden=16, mamba_heads_per_group=2, ffn=24, experts=2)


def scenario_slice(tmp: Path) -> dict:
    """A nested submodel extracted into a standalone model on the card, and its forward."""
    import torch

    import nestlm
    from nestlm.model.extract import extract

    with fake_cuda() as c:
        small = extract(_model_on_cuda(), nestlm.SubArch(**SMALL))
        devices = {str(p.device) for p in small.parameters()}
        small(torch.randint(0, 64, (2, 8), device="cuda"))
    return {"devices": sorted(devices), "syncs": c.syncs}


def scenario_generate(tmp: Path) -> dict:
    """Cached greedy and sampled generation (stop tokens, top-p, repetition penalty) at a budget."""
    import torch

    import nestlm
    from nestlm.inference.generate import Sampling, generate

    with fake_cuda(truth=False) as c:
        model, ids = _model_on_cuda(), torch.randint(0, 64, (2, 5), device="cuda")
        out = generate(model, ids, 4, sub=nestlm.SubArch(**SMALL), stop_tokens=[3])
        generate(model, ids, 4, sampling=Sampling(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.1, seed=0),
                 stop_sequences=[[1, 2]])
    return {"device": str(out.device), "shape": list(out.shape), "syncs": len(c.syncs)}


def scenario_two_phase(tmp: Path) -> dict:
    """Think with a small budget, answer with the full model: re-prefill and cache transplant."""
    import torch

    import nestlm
    from nestlm.inference.generate import Sampling
    from nestlm.inference.two_phase import generate_two_phase

    with fake_cuda(truth=False) as c:
        model, ids = _model_on_cuda(), torch.randint(0, 64, (1, 5), device="cuda")
        devices = []
        for switch in ("reprefill", "transplant"):
            r = generate_two_phase(model, ids, nestlm.SubArch(**SMALL), None, max_think_tokens=3,
                                   max_answer_tokens=3, end_think=[7, 8], stop_tokens=[2], switch=switch,
                                   sampling=Sampling(temperature=0.7, seed=1))
            devices.append(str(r.tokens.device))
    return {"devices": devices, "syncs": len(c.syncs)}


def scenario_engine(tmp: Path) -> dict:
    """The server's continuous-batching engine (nestlm.inference.serve.engine.Engine) on the card: a plain
    and a think-small, answer-large request in one running batch, streamed. The checkpoint is written and
    read on the host, then moved; the scheduler loop runs in this thread (fake mode is per thread) and
    ends when both requests are done."""
    import warnings

    import torch

    import nestlm
    from nestlm.data import ByteTokenizer
    from nestlm.elastic.artifact import export
    from nestlm.elastic.router import Router
    from nestlm.inference.generate import Sampling
    from nestlm.inference.serve.engine import Engine, Generation

    model = nestlm.Decoder(_tiny(vocab_size=ByteTokenizer().vocab_size))
    ecfg = nestlm.ElasticConfig(budgets=[1.0, 0.7], align=4, router_hidden=4, steps=1, sort=False,
                                choices={"hidden": [1.0, 0.75], "mamba_heads_per_group": [1.0, 0.5]})
    with warnings.catch_warnings():  # the untrained router's choice may miss 70%: the manifest says so
        warnings.simplefilter("ignore")
        export(model, Router(model.cfg, ecfg), ecfg, tmp / "elastic")
    ByteTokenizer().save(tmp / "elastic")
    engine = Engine(tmp / "elastic")
    full, small = list(engine.budgets.values())
    ids = engine.prompt_ids("Q:", bos=True)
    gens = [Generation(ids=ids, answer_sub=full, think_sub=think, max_think=3, max_tokens=3,
                       sampling=Sampling(temperature=0.5, seed=0)) for think in (None, small)]
    phases, errors, done = [], [], []

    def sink(i, kind, payload):
        if kind == "delta":
            phases.append(payload[0])
        elif kind == "error":
            errors.append(payload.message if hasattr(payload, "message") else str(payload))
        if kind in ("done", "error"):
            done.append(i)
            if len(done) == len(gens):
                engine.inbox.put(None)  # the loop returns once nothing runs

    with fake_cuda(truth=False) as c:
        engine.elastic.to("cuda")
        engine.device = torch.device("cuda:0")
        engine.submit(gens, sink)
        engine._loop()
    if errors:
        raise RuntimeError(errors[0])
    return {"device": str(engine.elastic.embeddings.weight.device), "phases": sorted(set(phases)),
            "done": sorted(done), "syncs": len(c.syncs)}


def scenario_bug(tmp: Path) -> dict:
    """A deliberate bug: the model's output meets a 1-d CPU tensor on its way into the loss. Must raise."""
    import torch

    import nestlm
    from nestlm.model.decoder import Decoder

    forward = Decoder.forward
    Decoder.forward = lambda self, *a, **k: forward(self, *a, **k) + torch.zeros(1)  # the bug
    try:
        test = scenario_train.__wrapped__ if hasattr(scenario_train, "__wrapped__") else scenario_train
        return test(tmp)
    finally:
        Decoder.forward = forward
        del nestlm


def main(names: list[str]) -> None:
    import tempfile

    lib = library()
    if not isinstance(lib, Path):
        print(json.dumps({"skip": lib}))
        return
    _activate(lib)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            try:
                results[name] = {"ok": True, **globals()[f"scenario_{name}"](Path(d) / name)}
            except Exception as e:  # reported to the test, which names the failing scenario
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:400],
                                 "where": [f"{f.filename.split(os.sep)[-1]}:{f.lineno}:{f.name}"
                                           for f in traceback.extract_tb(e.__traceback__) if "torch" not in f.filename][-8:]}
    print(json.dumps(results), flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip teardown: freeing fake CUDA tensors at exit can crash the no-op guard


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src")) if os.environ.get("PYTHONPATH") is None else None
    main(sys.argv[1:])
