"""bench/gpu.py, the one-go GPU check, on its CPU quick path (`--device cpu --quick`): every check passes and
the table has a row per model and budget. On a GPU machine the same script runs at real sizes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("nestlm_bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_on_cpu_quick():
    gpu = load_script()
    out = gpu.main(["--device", "cpu", "--quick", "--skip-pytest"])  # pytest inside pytest: left out here
    checks = re.findall(r"^\| (.+?) \| (pass|FAIL) \|", out, re.M)
    assert len(checks) == 7 and all(r == "pass" for _, r in checks), checks
    rows = re.findall(r"^\| (llama \(tiny\)|nemotron_h \(tiny\)) \| [\d.,]+M \| 2 x 64 \| (\d+)% \| ([\d.]+) ms \| "
                      r"([\d,]+) \|", out, re.M)
    assert [(m, int(b)) for m, b, _, _ in rows] == [(m, b) for m in ("llama (tiny)", "nemotron_h (tiny)")
                                                     for b in (100, 75, 50)]
    assert all(float(ms) > 0 and int(tps.replace(",", "")) > 0 for _, _, ms, tps in rows)
    assert "float32" in out.splitlines()[0] and "cpu" in out.splitlines()[0]


def test_gpu_check_flop_count_matches_a_hand_count():
    """6 x params per token for the student step + 2 x params for the teacher, plus attention's scores."""
    import nestlm

    gpu = load_script()
    cfg = nestlm.ModelConfig(family="llama", vocab_size=100, hidden_size=16, pattern="*-", num_heads=2,
                             num_kv_heads=1, head_dim=8, intermediate_size=32, mlp_act="swiglu",
                             rope_theta=10000.0, tie_embeddings=True)
    n = 100 * 16 + (16 + 16 * 16 + 2 * 16 * 8 + 16 * 16) + (16 + 3 * 16 * 32) + 16  # embeddings, blocks, norm
    assert nestlm.count_params(cfg) == n
    attn = 2 * 2 * 2 * 8 * 10 / 2  # QK^T and PV, 2 heads of 8, causal half of 10 positions, per token
    assert gpu.step_flops(cfg, nestlm.SubArch(), tokens=20, seq=10) == 20 * (8 * n + 4 * attn)


def test_unknown_card_needs_a_peak():
    gpu = load_script()
    assert gpu.peak_flops(torch.device("cpu"), None) == (None, "n/a on cpu")
    assert gpu.peak_flops(torch.device("cpu"), 500.0) == (500e12, "--peak-tflops")


@pytest.mark.parametrize("argv", [[], ["--device", "cpu"], ["--device", "cuda", "--quick"], ["--dtype", "fp32"]])
def test_without_cuda_anything_but_the_cpu_quick_run_exits_2_before_allocating(argv, monkeypatch, capsys):
    """Issue 26: `python bench/gpu.py` on a machine without CUDA ran the full sizes on the CPU (23.5 GB, killed)."""
    gpu = load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def allocates(*a, **k):
        raise AssertionError("allocated before refusing")

    for name in ("checks", "bench_model", "model_configs"):
        monkeypatch.setattr(gpu, name, allocates)
    monkeypatch.setattr("nestlm.device.resolve", allocates)
    with pytest.raises(SystemExit) as e:
        gpu.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--device cpu --quick" in err


def test_without_cuda_the_script_exits_2_as_a_process():
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
