"""MR -> CT synthesis on the Harvard pairs: diffusion against a regression UNet of equal training wall time.

For each seed the two arms train one after the other (diffusion, then the UNet, then the next seed: interleaved, so
the machine's load falls on both), each for the same ``--minutes`` of wall time (Lightning's ``max_time``); then
every model is run with ``medidiff infer`` on the 20 test pairs (series 41, never seen in training) and scored with
``medidiff evaluate --task synthesis`` (PSNR / SSIM / NMSE / MAE on the 8-bit CT scale). Rows: the diffusion model
at its validated step count (one sample, and the mean of 4), the UNet, and the MRI itself as a floor.

    python tasks/synthesis/results.py --minutes 8 --seeds 0 1 --out runs/synthesis_results
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from medidiff.checkpoint import read_checkpoint
from medidiff.cli import main as medidiff
from medidiff.data.cards import load_card

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import Row, machine, run_image_row  # noqa: E402

ARMS = {"diffusion": "configs/synthesis/harvard_mr_to_ct.yaml",
        "unet": "configs/synthesis/harvard_mr_to_ct_unet.yaml"}


def test_pairs(out: Path) -> tuple[Path, Path]:
    """The card's test split as two folders (MRI inputs, CT references), file names kept."""
    inputs, refs = out / "test_mri", out / "test_ct"
    for folder in (inputs, refs):
        folder.mkdir(parents=True, exist_ok=True)
    for case in load_card("harvard_mr_to_ct").splits["test"].cases:
        shutil.copy(case["image"], inputs / Path(case["image"]).name)
        shutil.copy(case["target"], refs / Path(case["target"]).name)
    return inputs, refs


def train(arm: str, seed: int, minutes: float, out: Path) -> dict:
    """One arm, one seed, ``minutes`` of wall time; returns its checkpoint, steps and seconds."""
    root = out / f"{arm}_seed{seed}"
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    start, trained = time.perf_counter(), not last.exists()
    if trained:
        code = medidiff(["fit", "--config", ARMS[arm], "--seed_everything", str(seed), "--data.seed", str(seed),
                         "--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
                         "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
        if code:
            raise SystemExit(f"training {arm} seed {seed} failed")
    seconds = time.perf_counter() - start
    return {"arm": arm, "seed": seed, "ckpt": str(last), "steps": int(read_checkpoint(last)["global_step"]),
            "train_seconds": round(seconds, 1) if trained else None}


def rows_of(run: dict, inputs: Path) -> list[Row]:
    name, ckpt = f"{run['arm']}_seed{run['seed']}", Path(run["ckpt"])
    if run["arm"] == "unet":
        return [Row(name, inputs, ckpt, [])]
    return [Row(name, inputs, ckpt, []), Row(f"{name}_ens4", inputs, ckpt, ["--ensemble", "4"])]


def summary(rows: list[dict]) -> list[dict]:
    """Mean and spread (std over seeds) of each kind of row."""
    kinds: dict[str, list[dict]] = {}
    for row in rows:
        kinds.setdefault(re.sub(r"_seed\d+", "", row["row"]), []).append(row)
    return [{"kind": kind, "seeds": len(group), **{m: [float(np.mean([r[m] for r in group])),
                                                       float(np.std([r[m] for r in group]))]
                                                   for m in ("psnr", "ssim", "mae")},
             "train_steps": [r["train_steps"] for r in group]} for kind, group in kinds.items()]


def paired(out: Path, seeds: list[int]) -> dict:
    """Per test pair, each arm's metric averaged over seeds; diffusion against the UNet: mean difference, pairs on
    which diffusion is better, Wilcoxon signed-rank p."""
    from scipy.stats import wilcoxon

    def per_case(name: str) -> dict[str, dict]:
        return {c["case"]: c for c in json.loads((out / f"{name}.json").read_text())["cases"]}

    arms = {arm: [per_case(f"{arm}_seed{s}") for s in seeds] for arm in ARMS}
    names = sorted(arms["unet"][0])
    result = {}
    for metric, higher in (("psnr", True), ("ssim", True), ("mae", False)):
        d, u = (np.array([np.mean([run[k][metric] for run in arms[arm]]) for k in names]) for arm in ARMS)
        better = int((d > u).sum() if higher else (d < u).sum())
        result[metric] = {"mean_difference": float((d - u).mean()), "diffusion_better": better, "pairs": len(names),
                          "wilcoxon_p": float(wilcoxon(d, u).pvalue)}
    return result


def picture(out: Path, inputs: Path, refs: Path, case: str, path: Path) -> None:
    """MRI | diffusion (seed 0) | UNet (seed 0) | CT, for one test pair."""
    from medidiff import io
    from medidiff.report import panel

    def upright(file: Path):
        return np.rot90(io.read(file)[0].numpy(), -1)  # the panel turns arrays stored x first; PNGs are rows first

    views = [("MRI (input)", inputs / f"{case}.png"), ("diffusion", out / "diffusion_seed0" / f"{case}.nii.gz"),
             ("regression UNet", out / "unet_seed0" / f"{case}.nii.gz"), ("CT (reference)", refs / f"{case}.png")]
    panel([(caption, upright(file), "image") for caption, file in views], path,
          f"MR -> CT synthesis, test pair {case} (8 training minutes each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall time of each model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("runs/synthesis_results"))
    args = parser.parse_args()
    inputs, refs = test_pairs(args.out)
    runs = [train(arm, seed, args.minutes, args.out) for seed in args.seeds for arm in ARMS]
    rows = [run_image_row("synthesis", Row("mri_itself", inputs, note="the input, scored as a CT"), args.out, refs,
                          255.0)]
    for run in runs:
        for row in rows_of(run, inputs):
            result = run_image_row("synthesis", row, args.out, refs, 255.0)
            rows.append(result | {"train_steps": run["steps"], "train_seconds": run["train_seconds"]})
    report = {"machine": machine(), "minutes": args.minutes, "seeds": args.seeds, "runs": runs, "rows": rows,
              "summary": summary(rows[1:]), "paired": paired(args.out, args.seeds)}
    (args.out / "rows.json").write_text(json.dumps(report, indent=1))
    picture(args.out, inputs, refs, "41016", Path(__file__).with_name("harvard_mr_to_ct.png"))
    print(json.dumps({k: report[k] for k in ("summary", "paired")}, indent=1))


if __name__ == "__main__":
    main()
