"""Run every benchmark in bench/ (each `bench_*.py` with a `main(argv)`), then print all their tables.

    python bench/run.py                   # every bench, full settings
    python bench/run.py --quick           # arguments are passed to every bench's main(argv)
    python bench/run.py --only model      # just bench_model.py
"""

from __future__ import annotations

import importlib.util
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    """{name: path} of bench/bench_*.py, sorted by name ("model" for bench_model.py)."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"nestlm_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))  # benches may import their siblings
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(HERE))
    return mod


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = set(argv[i + 1].split(","))
        del argv[i:i + 2]
    benches = discover()
    if only:
        unknown = only - set(benches)
        if unknown:
            print(f"unknown benches {sorted(unknown)}; have {sorted(benches)}", file=sys.stderr)
            return 2
        benches = {k: v for k, v in benches.items() if k in only}
    results, failed = {}, []
    for name, path in benches.items():
        mod = load(path)
        if not callable(getattr(mod, "main", None)):
            continue
        print(f"\n=== bench_{name} {' '.join(argv)}", flush=True)
        t0 = time.time()
        try:
            table = mod.main(argv)
        except SystemExit as e:  # argparse errors, or a bench that exits on purpose
            if e.code:
                failed.append(name)
            continue
        except Exception:  # report it, run the other benches
            traceback.print_exc()
            failed.append(name)
            continue
        results[name] = (table, time.time() - t0)
    print("\n" + "=" * 30 + " summary " + "=" * 30)
    for name, (table, dt) in results.items():
        print(f"\n## bench_{name} ({dt:.0f} s)\n")
        print(table if isinstance(table, str) else "(no table returned; see its output above)")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
