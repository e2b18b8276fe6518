"""DRIVE results table: diffusion at several NFE and ensemble sizes, DDPM-1000 on a subset, and the UNet
baseline — every row produced by `medidiff infer` + `medidiff evaluate`, timed, in one run.

    python tasks/segmentation/drive_results.py --diffusion CKPT --unet CKPT [--out runs/drive_results]

Train the two checkpoints first (8 CPU minutes each, seed 0):
    medidiff fit --config configs/segmentation/drive_2d.yaml
    medidiff fit --config configs/segmentation/drive_2d_unet.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from medidiff.cli import main as medidiff

DRIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "drive" / "test"


def subset(out: Path, cases: list[str]) -> dict[str, Path]:
    """Folders holding only ``cases`` (symlinks), for rows too slow to run on all 20 test images."""
    folders = {}
    for kind, pattern in (("images", "{}_test.tif"), ("1st_manual", "{}_manual1.gif"), ("mask", "{}_test_mask.gif")):
        folder = out / "subset" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = folder / pattern.format(case)
            if not link.exists():
                link.symlink_to(DRIVE / kind / pattern.format(case))
        folders[kind] = folder
    return folders


def run_row(name: str, ckpt: Path, out: Path, folders: dict[str, Path], infer_args: list[str],
            seconds: float | None = None) -> dict:
    """Infer (unless ``seconds`` of an earlier run are given: then only evaluate) and evaluate one row."""
    pred = out / name
    if seconds is None:
        shutil.rmtree(pred, ignore_errors=True)
        start = time.perf_counter()
        code = medidiff(["infer", "--task", "segmentation", "--ckpt", str(ckpt), "--input",
                         str(folders["images"]), "--output", str(pred), *infer_args])
        seconds = time.perf_counter() - start
        if code:
            raise SystemExit(f"infer failed for row {name}")
    metrics = out / f"{name}.json"
    medidiff(["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(folders["1st_manual"]),
              "--region", str(folders["mask"]), "--card", "drive", "--out", str(metrics)])
    summary = json.loads(metrics.read_text())["summary"]
    return {"row": name, "args": " ".join(infer_args), "dice": summary["dice_mean"]["mean"],
            "dice_std": summary["dice_mean"]["std"], "hd95": summary["hd95_mean"]["mean"],
            "n": summary["dice_mean"]["n"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion", type=Path, required=True)
    parser.add_argument("--unet", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/drive_results"))
    parser.add_argument("--ddpm-cases", default="01", help="test cases for the DDPM-1000 row")
    parser.add_argument("--skip-ddpm", action="store_true")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-score the predictions of an earlier run (its rows.json gives the times)")
    args = parser.parse_args()
    full = {"images": DRIVE / "images", "1st_manual": DRIVE / "1st_manual", "mask": DRIVE / "mask"}
    few = subset(args.out, args.ddpm_cases.split(","))
    plan = [("unet", args.unet, full, [])]
    plan += [(f"dpmpp_2m_nfe{nfe}", args.diffusion, full, ["--steps", str(nfe)]) for nfe in (1, 5, 10, 20, 50)]
    plan += [("dpmpp_2m_nfe10_ens5", args.diffusion, full, ["--steps", "10", "--ensemble", "5"]),
             ("dpmpp_2m_sde_nfe10_ens5_staple", args.diffusion, full,
              ["--sampler", "dpmpp_2m_sde", "--steps", "10", "--ensemble", "5", "--fusion", "staple"])]
    if not args.skip_ddpm:
        plan += [("subset_dpmpp_2m_nfe10", args.diffusion, few, ["--steps", "10"]),
                 ("subset_ddpm_1000", args.diffusion, few, ["--sampler", "ddpm", "--steps", "1000", "--grid",
                                                            "trailing"])]
    earlier = {}
    if args.evaluate_only:
        earlier = {r["row"]: r["seconds"] for r in json.loads((args.out / "rows.json").read_text())}
    rows = [run_row(name, ckpt, args.out, folders, infer_args, earlier.get(name) if args.evaluate_only else None)
            for name, ckpt, folders, infer_args in plan]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\n| row | infer arguments | n | vessel Dice (mean ± std) | HD95 px | wall time | machine |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | `{r['args'] or '(checkpoint defaults)'}` | {r['n']} | {r['dice']:.3f} ± "
              f"{r['dice_std']:.3f} | {r['hd95']:.1f} | {r['seconds']:.0f} s | {machine} |")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
