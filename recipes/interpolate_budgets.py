"""Budgets between the trained ones: the router's two interpolation rules against the trained budgets, by
cost and held-out KJV perplexity (the demo's validation split), on an elastic checkpoint of the demo.

    nestlm demo --out /tmp/demo && python recipes/interpolate_budgets.py /tmp/demo/elastic

"argmax": blend the neighbouring budgets' one-hots, take each axis's most likely width (Router.interpolate
with tol=None). "landing": the most probable architecture under the blend whose cost lies within the
checkpoint's landing_tolerance of the fraction (what `nestlm slice --budget 0.6` uses).
"""

from __future__ import annotations

import argparse

from nestlm.arch import SubArch, count_params
from nestlm.data import ByteTokenizer, kjv_text, perplexity, split
from nestlm.elastic.config import budget_name
from nestlm.load import load_elastic


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("elastic", help="an elastic checkpoint folder of the demo model (byte tokens)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    ap.add_argument("--windows", type=int, default=96, help="validation windows of 128 bytes")
    args = ap.parse_args(argv)
    _, val = split(ByteTokenizer().encode_tensor(kjv_text()), val_frac=0.05)
    model, router, manifest = load_elastic(args.elastic)
    full = count_params(model.cfg)
    rows = [{"fraction": b["fraction"], "rule": "trained", "sub": SubArch.from_dict(b["sub"])}
            for b in manifest["budgets"].values()]
    for frac in args.fractions:
        rows.append({"fraction": frac, "rule": "argmax", "sub": router.interpolate(frac)})
        rows.append({"fraction": frac, "rule": "landing",
                     "sub": router.interpolate(frac, router.ecfg.landing_tolerance)})
    print("| fraction | rule | cost | held-out ppl |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (-r["fraction"], r["rule"])):
        r["cost"] = count_params(model.cfg, r["sub"]) / full
        r["ppl"] = perplexity(model, val, 128, batch=16, sub=r["sub"], max_windows=args.windows)
        print(f"| {budget_name(r['fraction'])} | {r['rule']} | {r['cost']:.3f} | {r['ppl']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
