"""Paired per-case comparison of two `medidiff evaluate` results on the same cases: mean Dice of each, the mean
difference, on how many cases A is higher, and the two-sided Wilcoxon signed-rank p of the differences.

    python tasks/segmentation/paired_dice.py A.json B.json [--metric dice_vessel]

The p-values in tasks/segmentation/README.md ("Diffusion over a stronger predictor") came from this script on the
`runs/i16s/unc*/ROW.json` files `drive_uncertainty.py` wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import wilcoxon


def per_case(path: Path, metric: str) -> dict[str, float]:
    cases = json.loads(path.read_text())["cases"]
    if isinstance(cases, dict):
        return {name: values[metric] for name, values in cases.items()}
    return {case["case"]: case[metric] for case in cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--metric", default="dice_vessel")
    args = parser.parse_args()
    a, b = per_case(args.a, args.metric), per_case(args.b, args.metric)
    if set(a) != set(b):
        raise SystemExit(f"{args.a} and {args.b} hold different cases: {sorted(set(a) ^ set(b))}")
    differences = [a[name] - b[name] for name in sorted(a)]
    n = len(differences)
    print(f"{args.metric}: A {sum(a.values()) / n:.4f}  B {sum(b.values()) / n:.4f}  "
          f"mean A - B {sum(differences) / n:+.4f}  A higher on {sum(d > 0 for d in differences)} / {n}  "
          f"Wilcoxon p {wilcoxon(differences).pvalue:.3g}")


if __name__ == "__main__":
    main()
