"""Where a command computes and in which precision: the one rule for `--device` and `--dtype`.

    dev = resolve_device(None)             # cuda when available, else cpu; "cuda:1", "cpu", "mps" as given
    dt = resolve_dtype(None, dev)          # bf16 on CUDA, fp32 on CPU; "bf16" | "fp32" as given
    with autocast(dt, dev): logits = model(ids)     # bf16 compute over fp32 weights (a no-op for fp32)

bf16 runs on CPU too (slowly), so CI tests the same code path; on a CUDA card without bf16 (before
Ampere) it is refused. Bad requests raise ConfigError with one line that names what is available.

And how many CPU threads torch uses (`--threads` on every command that computes):

    set_threads(None)                      # the cores nobody else keeps busy (default_threads), at least 1
    with torch_threads(4): ...             # the same, restored afterwards
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from nestlm.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch.device to run on: None -> cuda when available, else cpu. Raises ConfigError for a device
    this machine doesn't have (no CUDA, an index past the last card, an unknown name)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}, CUDA build {torch.version.cuda}); use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"device {device}: MPS is not available on this machine; use device='cpu'")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device}: nestlm runs on cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute precision: None -> bf16 on CUDA, fp32 elsewhere. Raises ConfigError for an unknown name or
    bf16 on a CUDA card without it."""
    if dtype is None:
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ConfigError(f"dtype {dtype}: use one of {sorted(DTYPES)}")
        dtype = names[dtype]
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"dtype bf16: {name} has no bf16 support (needs compute capability 8.0+); "
                          "use dtype='fp32'")
    return DTYPES[dtype]


def resolve(device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a command's --device / --dtype (see resolve_device, resolve_dtype)."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def autocast(dtype: torch.dtype, device: torch.device):
    """bf16 mixed precision (weights stay fp32, matmuls run in bf16) for dtype bf16; nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def own_precision(fn):
    """Decorator: `fn` runs in the precision its code casts to (fp32 where it says .float()), also inside an
    autocast region; for numerics that must stay fp32 (the SSD scan, the MoE router). The first tensor
    argument's device says which autocast to leave. Outside autocast: one check, nothing else."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(dev):
            return fn(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def default_threads() -> int:
    """The default of `--threads`: the cores this process may run on (its CPU affinity) less those that
    other processes keep busy (the 1-minute load average, rounded), at least 1. On an idle machine that is
    every core; on a busy one it is few: torch's OpenMP threads spin waiting for each other, and a thread
    that shares its core with another process stalls the rest (measured on a busy 2-core machine: eval of
    the demo's checkpoint 26 s with torch's 2 threads against 3.7 s with one; see the --threads help)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - round(load)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads: `threads` as given, or default_threads() for None; returns the
    number set. The one rule behind every command's --threads (ConfigError for a count below 1)."""
    n = default_threads() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads(threads: int | None = None):
    """set_threads(threads) for the duration of a block, torch's previous count restored afterwards."""
    saved = torch.get_num_threads()
    try:
        yield set_threads(threads)
    finally:
        torch.set_num_threads(saved)
