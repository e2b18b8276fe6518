"""DRIVE segmentation: a distilled few-step student against its teacher at 1, 2, 5 and 10 NFE (and a UNet, for time
per case), on the 20 test images — every row ``medidiff infer`` + ``medidiff evaluate``, timed, in one run.

    python benchmarks/bench_distill_drive.py --teacher CKPT --student [LABEL=]CKPT [--student ...] [--unet CKPT]
        [--out DIR]

Train first (seed 0):
    medidiff fit --config configs/segmentation/drive_2d.yaml             # the teacher
    medidiff fit --config configs/segmentation/drive_2d_distill.yaml     # its 1-step student
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ helpers
from benchmarks.results import distillation_arguments, machine, task_script, training_steps  # noqa: E402


def main() -> None:
    args = distillation_arguments(__doc__, "runs/distill_drive")
    script = task_script("tasks/segmentation/drive_results.py")
    full = {kind: script.DRIVE / kind for kind in ("images", "1st_manual", "mask")}
    plan = [("unet", args.unet, [])] if args.unet else []
    plan += [(f"teacher_nfe{n}", args.teacher, ["--steps", n]) for n in args.teacher_nfe.split(",")]
    plan += [(f"{label}_nfe{n}", ckpt, ["--steps", n]) for label, ckpt in args.students
             for n in args.student_nfe.split(",")]
    rows = [script.run_row(name, ckpt, args.out, full, infer_args) for name, ckpt, infer_args in plan]
    steps = training_steps(args)
    print("\n| row | infer arguments | n | vessel Dice (mean ± std) | HD95 px | infer time (20 images) | machine |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | `{r['args'] or '(checkpoint defaults)'}` | {r['n']} | {r['dice']:.3f} ± "
              f"{r['dice_std']:.3f} | {r['hd95']:.1f} | {r['seconds']:.1f} s | {machine()} |")
    (args.out / "rows.json").write_text(json.dumps({"training_steps": steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
