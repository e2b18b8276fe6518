"""Super-resolution (MNI152 through-plane x4): a distilled 2-step student against its teacher at 1, 2, 5 and 10 NFE,
with cubic interpolation + consistency and, for time per case, the regression UNet, on the held-aside slab of
``tasks/superres/results.py`` — every row ``medidiff infer`` + ``medidiff evaluate``, timed, in one run.

    python benchmarks/bench_distill_superres.py --teacher CKPT --student [LABEL=]CKPT [--student ...]
        [--unet CKPT] [--out DIR]

Train first (seed 0):
    medidiff fit --config configs/superres/mni152_3d_x4.yaml             # the teacher
    medidiff fit --config configs/superres/mni152_3d_x4_distill.yaml     # its 2-step student
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ helpers
from benchmarks.results import Row, distillation_arguments, image_table, run_image_row, task_script, training_steps  # noqa: E402


def main() -> None:
    args = distillation_arguments(__doc__, "runs/distill_superres")
    script = task_script("tasks/superres/results.py")
    refs, inputs, baselines = script.held_aside_case(args.out)
    plan = [Row("cubic_dc", baselines["cubic_dc"], note="cubic + DC interpolation")]
    plan += [Row("unet_dc", inputs, args.unet)] if args.unet else []
    plan += [Row(f"teacher_nfe{n}", inputs, args.teacher, ["--steps", n]) for n in args.teacher_nfe.split(",")]
    # the student's own grid at the teacher: what distillation adds beyond choosing a better 2-step grid
    plan += [Row("teacher_trailing_nfe2", inputs, args.teacher, ["--steps", "2", "--grid", "trailing"])]
    plan += [Row(f"{label}_nfe{n}", inputs, ckpt, ["--steps", n]) for label, ckpt in args.students
             for n in args.student_nfe.split(",")]
    rows = [run_image_row("superres", row, args.out, refs, script.DATA_RANGE) for row in plan]
    steps = training_steps(args)
    print("\n" + image_table(rows))
    (args.out / "rows.json").write_text(json.dumps({"training_steps": steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
