"""medidiff's own commands: ``infer``, ``evaluate`` and ``export`` (LightningCLI handles ``fit`` etc.)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from medidiff.errors import MedidiffError

TASK_NAMES = ("segmentation", "restoration", "superres", "fusion")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medidiff", description="Conditional diffusion for medical imaging. "
                                     "Training: medidiff fit|validate|test|predict --config CONFIG.yaml")
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", help="run a trained model on a scan or a folder of scans")
    infer.add_argument("--task", choices=TASK_NAMES, required=True)
    infer.add_argument("--ckpt", type=Path, default=None,
                       help="checkpoint from `medidiff fit` or `export` (default: the shipped demo model of the "
                            "task for the input's dimension)")
    infer.add_argument("--input", required=True, help="a scan, a DICOM series folder, or a folder of scans")
    infer.add_argument("--input-b", help="fusion: the second source (a file, or a folder paired by file name)")
    infer.add_argument("--output", type=Path, required=True, help="folder for the results")
    infer.add_argument("--sampler", default=None, help="sampler name (default: the checkpoint's)")
    infer.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    infer.add_argument("--grid", default=None, choices=("karras", "exponential", "trailing", "leading", "linspace"))
    infer.add_argument("--ensemble", type=int, default=1, help="samples per case, drawn as one batch")
    infer.add_argument("--fusion", default="mean", choices=("mean", "vote", "staple"),
                       help="how ensemble members become one label map")
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    infer.add_argument("--mask", type=Path, default=None,
                       help="restoration: k-space sampling mask (NIfTI/PNG, 0/1 over the last two axes) of the input")
    infer.add_argument("--no-consistency", action="store_true",
                       help="restoration, superres: skip the data-consistency step (to measure what it adds)")

    evaluate = sub.add_parser("evaluate", help="score predictions against references, file to file")
    evaluate.add_argument("--task", choices=TASK_NAMES, required=True)
    evaluate.add_argument("--pred", type=Path, required=True)
    evaluate.add_argument("--ref", type=Path, help="reference folder (segmentation, restoration, superres)")
    evaluate.add_argument("--card", help="data card: label names, label remap and data range")
    evaluate.add_argument("--region", type=Path, help="folder of region masks (e.g. DRIVE field of view)")
    evaluate.add_argument("--source-a", type=Path, help="fusion: first source folder")
    evaluate.add_argument("--source-b", type=Path, help="fusion: second source folder")
    evaluate.add_argument("--data-range", type=float, default=None, help="image tasks: intensity range")
    evaluate.add_argument("--out", type=Path, required=True, help="JSON file with per-case rows and a summary")

    demo = sub.add_parser("demo", help="run every task's shipped model on the shipped sample scans")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for outputs and report.md")
    demo.add_argument("--steps", type=int, default=10, help="sampler steps (NFE) for every task")
    demo.add_argument("--ensemble", type=int, default=3, help="ensemble size for segmentation")
    demo.add_argument("--only", nargs="*", default=None, help="run only these tasks")

    plot = sub.add_parser("plot-logs", help="training curves (PNG) from a Lightning metrics.csv")
    plot.add_argument("log", type=Path, help="metrics.csv of a run (runs/.../lightning_logs/version_N/metrics.csv)")
    plot.add_argument("--out", type=Path, default=None, help="PNG to write (default: beside the log)")

    export = sub.add_parser("export", help="shrink a training checkpoint to weights and settings")
    export.add_argument("--ckpt", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    return parser


def run_command(argv: Sequence[str]) -> None:
    args = _parser().parse_args(list(argv))
    {"infer": _infer, "evaluate": _evaluate, "export": _export, "demo": _demo,
     "plot-logs": _plot_logs}[args.command](args)


def _plot_logs(args: argparse.Namespace) -> None:
    from medidiff.report import plot_logs

    print(f"wrote {plot_logs(args.log, args.out or args.log.with_suffix('.png'))}")


def _demo(args: argparse.Namespace) -> None:
    from medidiff.demo import run_demo

    run_demo(args.out, steps=args.steps, ensemble=args.ensemble, only=args.only)


def _infer(args: argparse.Namespace) -> None:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from medidiff.checkpoint import load_module
    from medidiff.inference import SamplingOptions, infer

    _check_sampling_options(args)
    if args.no_consistency and args.task not in ("restoration", "superres"):
        raise MedidiffError(f"--no-consistency applies to restoration and superres, not {args.task}")
    if args.ckpt is None:
        args.ckpt = shipped_checkpoint(args.task, args.input)
    if args.task == "fusion":
        from medidiff.fusion_infer import infer_command

        return infer_command(args)
    module, data_hparams = load_module(args.ckpt, task=args.task)
    module.to(torch.device(args.device))
    hp = module.hparams
    # deterministic baselines have no sampler settings: SamplingOptions' defaults only fill the record
    defaults = SamplingOptions()
    options = SamplingOptions(sampler=args.sampler or hp.get("sampler", defaults.sampler),
                              steps=args.steps or hp.get("steps", defaults.steps),
                              grid=args.grid or hp.get("grid", defaults.grid), ensemble=args.ensemble,
                              seed=args.seed, fusion=args.fusion)
    if args.task in ("restoration", "superres"):
        from medidiff.inference_image import infer_image

        if args.no_consistency:
            module.hparams.consistency = False

        written = infer_image(module, data_hparams, args.input, args.output, options, args.ckpt, mask_path=args.mask)
        print(f"wrote {len(written)} files to {args.output}")
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn()) as bars:
        def progress_factory(case: str):
            bar = bars.add_task(f"{case}: sampling ({options.sampler}, {options.steps} steps, "
                                f"ensemble {options.ensemble})", total=None)
            return lambda done, total: bars.update(bar, completed=done, total=total)

        written = infer(module, data_hparams, args.input, args.output, options, args.ckpt,
                        report=bars.console.print, progress_factory=progress_factory)
    print(f"wrote {len(written)} files to {args.output}")


# the models `medidiff demo` runs, trained on the shipped sample (medidiff/weights, tasks/train_demo_models.sh)
SHIPPED = {("segmentation", 2): "segmentation_mni_2d", ("segmentation", 3): "segmentation_ct_3d",
           ("restoration", 2): "restoration_mni_2d", ("restoration", 3): "restoration_mni_2d",
           ("superres", 3): "superres_ct_3d", ("fusion", 2): "fusion_mni_2d", ("fusion", 3): "fusion_mni_2d"}


def shipped_checkpoint(task: str, input_path: str) -> Path:
    """The shipped demo model for a task and the input's spatial dimension (2D models run slice by slice)."""
    from medidiff import io
    from medidiff.demo import weights
    from medidiff.inference import list_inputs

    first = list_inputs(input_path)[0]
    dims = 3 if first.is_dir() else io.read(first).ndim - 1
    name = SHIPPED.get((task, dims))
    if name is None:
        raise MedidiffError(f"no shipped {task} model for {dims}D inputs; give one with --ckpt", first)
    print(f"no --ckpt given: using the shipped demo model {name} (trained for minutes on the sample data; "
          f"train your own for research, see the README)")
    return weights(name)


def _check_sampling_options(args: argparse.Namespace) -> None:
    """Refuse bad sampling options before any model is loaded or file written."""
    import torch

    from medidiff.core import SAMPLERS

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise MedidiffError(f"--sampler {args.sampler!r} is unknown; choose one of {', '.join(sorted(SAMPLERS))}")
    for option in ("steps", "ensemble"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise MedidiffError(f"--{option} must be at least 1, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise MedidiffError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedidiffError(f"--device {args.device}: CUDA is not available on this machine")


def _evaluate(args: argparse.Namespace) -> None:
    from medidiff.metrics import evaluate as E

    if args.task == "fusion":
        if not (args.source_a and args.source_b):
            raise MedidiffError("fusion evaluation needs --source-a and --source-b")
        result = E.evaluate_fusion(args.pred, args.source_a, args.source_b, out_json=args.out)
    elif args.ref is None:
        raise MedidiffError(f"{args.task} evaluation needs --ref")
    elif args.task == "segmentation":
        labels, remap = _card_labels(args.card)
        result = E.evaluate_segmentation(args.pred, args.ref, labels=labels, region_dir=args.region,
                                         label_remap=remap, out_json=args.out)
    else:
        result = E.evaluate_image(args.pred, args.ref, data_range=args.data_range or 1.0, out_json=args.out)
    for metric, stats in result["summary"].items():
        print(f"{metric:24s} mean {stats['mean']:.4f}  std {stats['std']:.4f}  n {stats['n']}")
    print(f"per-case results: {args.out}")


def _card_labels(card_name: str | None) -> tuple[dict[str, int] | None, dict[int, int] | None]:
    if card_name is None:
        return None, None
    from medidiff.data.cards import load_card

    card = load_card(card_name, check_files=False)
    # foreground classes only: a background Dice near 1 would inflate every mean
    foreground = {name: value for name, value in card.labels.items() if value != 0}
    return foreground, dict(card.label_remap) if card.label_remap else None


def _export(args: argparse.Namespace) -> None:
    from medidiff.checkpoint import export, load_module

    module, data_hparams = load_module(args.ckpt)
    path = export(module, data_hparams, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
