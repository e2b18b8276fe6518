"""DRIVE results table: diffusion at several NFE and ensemble sizes, DDPM-1000 on a subset, and the UNet
baseline — every row produced by `medidiff infer` + `medidiff evaluate`, timed, in one run.

    python tasks/segmentation/drive_results.py --diffusion CKPT --unet CKPT [--out runs/drive_results]

Train the two checkpoints first (seed 0, 900 steps each: about 4 and 1.5 minutes on a free 2-core CPU; add
--trainer.max_steps 3600 to both for the longer pair of the README):
    medidiff fit --config configs/segmentation/drive_2d.yaml
    medidiff fit --config configs/segmentation/drive_2d_unet.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from medidiff.checkpoint import read_checkpoint
from medidiff.cli import main as medidiff

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import infer_unless_complete  # noqa: E402

DRIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "drive" / "test"


def subset(out: Path, cases: list[str]) -> dict[str, Path]:
    """Folders holding only ``cases`` (symlinks), for rows too slow to run on all 20 test images."""
    folders = {}
    for kind, pattern in (("images", "{}_test.tif"), ("1st_manual", "{}_manual1.gif"), ("mask", "{}_test_mask.gif")):
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = folder / pattern.format(case)
            if not link.exists():
                link.symlink_to(DRIVE / kind / pattern.format(case))
        folders[kind] = folder
    return folders


def run_row(name: str, ckpt: Path, out: Path, folders: dict[str, Path], infer_args: list[str]) -> dict:
    """Infer (skipped for a row whose predictions are complete) and evaluate one row; the time is the sum of the
    per-case times in the provenance files (read, sample, write; model loading excluded)."""
    pred = out / name
    seconds = infer_unless_complete("segmentation", ckpt, folders["images"], pred, infer_args)
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
    parser.add_argument("--subset-cases", default="01,02", help="test cases for the costly rows (NFE 50, ensembles)")
    parser.add_argument("--ddpm-cases", default="01", help="test cases for the DDPM-1000 row")
    args = parser.parse_args()
    full = {"images": DRIVE / "images", "1st_manual": DRIVE / "1st_manual", "mask": DRIVE / "mask"}
    few, one = subset(args.out / "subset", args.subset_cases.split(",")), subset(args.out / "ddpm",
                                                                             args.ddpm_cases.split(","))
    plan = [("unet", args.unet, full, [])]
    plan += [(f"dpmpp_2m_nfe{nfe}", args.diffusion, full, ["--steps", str(nfe)]) for nfe in (1, 5, 10, 20)]
    plan += [("subset_unet", args.unet, few, []),
             ("subset_dpmpp_2m_nfe10", args.diffusion, few, ["--steps", "10"]),
             ("subset_dpmpp_2m_nfe50", args.diffusion, few, ["--steps", "50"]),
             ("subset_dpmpp_2m_nfe10_ens5", args.diffusion, few, ["--steps", "10", "--ensemble", "5"]),
             ("subset_dpmpp_2m_sde_nfe10_ens5_staple", args.diffusion, few,
              ["--sampler", "dpmpp_2m_sde", "--steps", "10", "--ensemble", "5", "--fusion", "staple"]),
             ("ddpm_case_dpmpp_2m_nfe10", args.diffusion, one, ["--steps", "10"]),
             ("ddpm_case_ddpm_1000", args.diffusion, one, ["--sampler", "ddpm", "--steps", "1000", "--grid",
                                                          "trailing"])]
    rows = [run_row(name, ckpt, args.out, folders, infer_args) for name, ckpt, folders, infer_args in plan]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    steps = {name: read_checkpoint(path)["global_step"] for name, path in (("diffusion", args.diffusion),
                                                                             ("unet", args.unet))}
    print(f"\ntraining steps: diffusion {steps['diffusion']}, UNet {steps['unet']}")
    print("\n| row | infer arguments | n | vessel Dice (mean ± std) | HD95 px | wall time | machine |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        spread = "" if r["dice_std"] is None or r["dice_std"] != r["dice_std"] else f" ± {r['dice_std']:.3f}"
        print(f"| {r['row']} | `{r['args'] or '(checkpoint defaults)'}` | {r['n']} | {r['dice']:.3f}{spread} | "
              f"{r['hd95']:.1f} | {r['seconds']:.0f} s | {machine} |")
    (args.out / "rows.json").write_text(json.dumps({"training_steps": steps, "rows": rows}, indent=1))
    plot_dice_vs_nfe([(rows, f"{steps['diffusion']} steps", "tab:blue")], args.out / "drive_dice_vs_nfe.png")


def plot_dice_vs_nfe(runs: list[tuple[list[dict], str, str]], path: Path) -> None:
    """Vessel Dice of the single-sample diffusion rows (all 20 images) against NFE, one curve per
    ``(rows, label, colour)`` run, with that run's UNet as a dashed line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for rows, label, colour in runs:
        points = sorted((int(r["args"].split()[-1]), r["dice"]) for r in rows
                        if r["row"].startswith("dpmpp_2m_nfe") and r["n"] == 20)
        ax.plot(*zip(*points), "o-", color=colour, label=f"diffusion, {label}")
        ax.axhline(next(r["dice"] for r in rows if r["row"] == "unet"), color=colour, linestyle="--", linewidth=1)
    ax.plot([], [], "k--", linewidth=1, label="UNet of the same steps (colour)")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations), dpmpp_2m")
    ax.set_ylabel("vessel Dice, DRIVE test (20)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
