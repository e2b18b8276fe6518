"""Flow matching against the DDPM objective at equal training steps: undersampled MRI (4x k-space, MNI152 T1),
quality at 1, 2, 5 and 10 NFE with and without k-space consistency, on the 25 held-aside slices of
``tasks/restoration/results.py`` — every row ``medidiff infer`` + ``medidiff evaluate``, in one run.

    python benchmarks/bench_flow_vs_ddpm.py --model ddpm=CKPT --model flow=CKPT [--model ...] [--out DIR]
    python benchmarks/bench_flow_vs_ddpm.py --model teacher=CKPT --model student=CKPT@1,2 --dc-only   # distillation

``NAME=CKPT@N,N`` gives one model its own NFE list; ``--extra NAME="ARGS"`` adds infer arguments to its rows
(e.g. ``--grid trailing``); ``--dc-only`` skips the rows without k-space consistency.

Train the checkpoints first, the same steps and seed (the config's DDPM predicts x0):
    medidiff fit --config configs/restoration/mni152_2d_kspace4x.yaml --trainer.max_steps 1200
    medidiff fit --config configs/restoration/mni152_2d_kspace4x.yaml --trainer.max_steps 1200 \\
        --model.init_args.diffusion.objective flow --model.init_args.diffusion.prediction_type v      # or sample
    medidiff fit --config configs/restoration/mni152_2d_kspace4x_unet.yaml --trainer.max_steps 1200   # --unet
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ helpers
from benchmarks.results import Row, image_table, run_image_row, task_script  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CKPT")
    parser.add_argument("--unet", type=Path, help="a regression UNet of the same task, timed and scored beside them")
    parser.add_argument("--out", type=Path, default=Path("runs/flow_vs_ddpm"))
    parser.add_argument("--nfe", default="1,2,5,10")
    parser.add_argument("--dc-only", action="store_true", help="only the rows with k-space consistency")
    parser.add_argument("--extra", action="append", default=[], metavar='NAME="ARGS"',
                        help="more infer arguments for one model's rows")
    args = parser.parse_args()
    script = task_script("tasks/restoration/results.py")
    refs, inputs, mask = script.held_aside_cases(args.out)
    plan = [Row("zero_filled", inputs, note="the input itself")]
    if args.unet:
        plan += [Row("unet_dc", inputs, args.unet, ["--mask", str(mask)]),
                 Row("unet", inputs, args.unet, ["--mask", str(mask), "--no-consistency"])]
    extra = {name: shlex.split(value) for name, _, value in (e.partition("=") for e in args.extra)}
    for entry in args.model:
        name, _, ckpt_and_nfe = entry.partition("=")
        ckpt, _, nfe = ckpt_and_nfe.partition("@")
        more = extra.get(name, [])
        for n in (nfe or args.nfe).split(","):
            plan.append(Row(f"{name}_dc_nfe{n}", inputs, Path(ckpt), ["--steps", n, *more, "--mask", str(mask)]))
            if not args.dc_only:
                plan.append(Row(f"{name}_nfe{n}", inputs, Path(ckpt),
                                ["--steps", n, *more, "--allow", "degradation"]))
    rows = [run_image_row("restoration", row, args.out, refs, script.DATA_RANGE) for row in plan]
    for r in rows:
        r["args"] = r["args"].replace(str(mask), "MASK")
    print("\n" + image_table(rows))
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
