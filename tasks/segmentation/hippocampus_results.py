"""MSD hippocampus (3D): diffusion, residual diffusion and the UNet at equal training wall time, several seeds.

For each seed the three arms train one after the other (UNet, diffusion, residual; then the next seed: interleaved,
so the machine's load falls on every arm), each for ``--minutes`` of wall time (Lightning's ``max_time``); the
residual arm spends half on its UNet predictor and half on the residual. Every model then runs ``medidiff infer`` on
the card's 40 test cases (diffusion arms: an ensemble of 4 at the validated step count) and is scored with
``medidiff evaluate --task segmentation --card msd_hippocampus --uncertainty``: per-class Dice, HD95 (mm), NSD,
ECE, Brier, NLL, error AUROC. Paired per-case statistics compare each diffusion arm with the UNet.

    python tasks/segmentation/hippocampus_results.py --minutes 10 --seeds 0 1 2 --out runs/hippocampus_10min
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from medidiff.checkpoint import read_checkpoint
from medidiff.cli import main as medidiff
from medidiff.data.cards import load_card

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import infer_unless_complete, machine  # noqa: E402

CONFIGS = {"unet": "configs/segmentation/hippocampus_3d_unet.yaml",
           "diffusion": "configs/segmentation/hippocampus_3d.yaml",
           "residual": "configs/segmentation/hippocampus_3d_residual.yaml"}
INFER = {"unet": [], "diffusion": ["--ensemble", "4"], "residual": ["--ensemble", "4"]}
METRICS = ("dice_anterior", "dice_posterior", "dice_mean", "hd95_mean", "nsd_mean", "ece", "brier", "nll",
           "error_auroc")


def test_cases(out: Path) -> tuple[Path, Path]:
    """The card's test split as two folders of the same file names (images, labels)."""
    images, labels = out / "test_images", out / "test_labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for case in load_card("msd_hippocampus").splits["test"].cases:
        shutil.copy(case["image"], images / Path(case["image"]).name)
        shutil.copy(case["label"], labels / Path(case["label"]).name)
    return images, labels


def fit(config: str, root: Path, seed: int, minutes: float, *extra: str) -> Path:
    """``medidiff fit`` for ``minutes`` of wall time (skipped when its last checkpoint exists)."""
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    if not last.exists():
        limit = f"00:00:{int(minutes):02d}:{int(round(minutes % 1 * 60)):02d}"
        if medidiff(["fit", "--config", config, "--seed_everything", str(seed), "--data.seed", str(seed),
                     "--trainer.max_time", limit, "--trainer.default_root_dir", str(root),
                     "--trainer.enable_progress_bar", "false", *extra]):
            raise SystemExit(f"training {root.name} failed")
    return last


def train(arm: str, seed: int, minutes: float, out: Path) -> dict:
    start, root = time.perf_counter(), out / f"{arm}_seed{seed}"
    if arm == "residual":
        predictor = fit(CONFIGS["unet"], out / f"predictor_seed{seed}", seed, minutes / 2)
        last = fit(CONFIGS["residual"], root, seed, minutes / 2, "--model.init_args.predictor_ckpt", str(predictor))
    else:
        last = fit(CONFIGS[arm], root, seed, minutes)
    contract = read_checkpoint(last)["medidiff"]["contract"]
    return {"arm": arm, "seed": seed, "ckpt": str(last), "steps": int(read_checkpoint(last)["global_step"]),
            "nfe": (contract.get("sampling") or {}).get("steps"), "wall_seconds": round(time.perf_counter() - start)}


def score(run: dict, images: Path, labels: Path, out: Path) -> dict:
    name = f"{run['arm']}_seed{run['seed']}"
    seconds = infer_unless_complete("segmentation", Path(run["ckpt"]), images, out / name, INFER[run["arm"]])
    result = out / f"{name}.json"
    if medidiff(["evaluate", "--task", "segmentation", "--pred", str(out / name), "--ref", str(labels), "--card",
                 "msd_hippocampus", "--uncertainty", "--out", str(result)]):
        raise SystemExit(f"evaluate failed for {name}")
    summary = json.loads(result.read_text())["summary"]
    return run | {"infer_seconds": round(seconds, 1), **{m: summary[m]["mean"] for m in METRICS if m in summary}}


def summarise(rows: list[dict]) -> dict:
    """Mean and std over seeds per arm (a metric no case could give, e.g. HD95 of empty maps, is NaN)."""
    arms = sorted({row["arm"] for row in rows}, key=list(CONFIGS).index)

    def values(arm: str, metric: str) -> np.ndarray:
        return np.array([np.nan if r.get(metric) is None else r[metric] for r in rows if r["arm"] == arm])

    return {arm: {m: [float(np.nanmean(values(arm, m))), float(np.nanstd(values(arm, m)))] for m in METRICS}
            for arm in arms}


def paired(rows: list[dict], out: Path) -> dict:
    """Per test case, each arm's mean Dice over seeds; each diffusion arm against the UNet."""
    def per_case(arm: str) -> np.ndarray:
        runs = [json.loads((out / f"{arm}_seed{r['seed']}.json").read_text())["cases"] for r in rows
                if r["arm"] == arm]
        return np.mean([[case["dice_mean"] for case in sorted(run, key=lambda c: c["case"])] for run in runs], 0)

    unet = per_case("unet")
    return {arm: {"mean_difference": float((per_case(arm) - unet).mean()),
                  "better_cases": int((per_case(arm) > unet).sum()), "cases": len(unet),
                  "wilcoxon_p": float(wilcoxon(per_case(arm), unet).pvalue)}
            for arm in ("diffusion", "residual") if any(r["arm"] == arm for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time of each model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("runs/hippocampus_10min"))
    parser.add_argument("--rows", type=Path, default=None, help="where to copy rows.json (e.g. into tasks/)")
    args = parser.parse_args()
    images, labels = test_cases(args.out)
    runs = [train(arm, seed, args.minutes, args.out) for seed in args.seeds for arm in args.arms]
    rows = [score(run, images, labels, args.out) for run in runs]
    report = {"machine": machine(), "minutes": args.minutes, "seeds": args.seeds, "rows": rows,
              "summary": summarise(rows), "paired_dice_mean": paired(rows, args.out)}
    (args.out / "rows.json").write_text(json.dumps(report, indent=1))
    if args.rows is not None:
        args.rows.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("summary", "paired_dice_mean")}, indent=1))


if __name__ == "__main__":
    main()
