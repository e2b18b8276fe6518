"""medidiff's own commands: ``infer``, ``evaluate`` and ``export`` (LightningCLI handles ``fit`` etc.)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from medidiff.errors import MedidiffError

TASK_NAMES = ("segmentation", "restoration", "superres", "fusion")
CLASSICAL_METHODS = ("average", "max_abs", "laplacian")
ALLOW = ("intensity", "clipping", "modality", "degradation")


def _grid(text: str) -> str | list[float]:
    """``--grid``: a named spacing, or comma-separated noise levels."""
    from typing import get_args

    from medidiff.core.denoiser import SigmaGrid  # here, not at import: the core pulls in torch

    names = get_args(SigmaGrid)
    if text in names:
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a grid name ({', '.join(names)}) nor "
                                         "comma-separated noise levels") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medidiff", description="Conditional diffusion for medical imaging. "
                                     "Training: medidiff fit|validate|test|predict --config CONFIG.yaml")
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", help="run a trained model on a scan or a folder of scans")
    infer.add_argument("--task", choices=TASK_NAMES, required=True)
    infer.add_argument("--ckpt", default=None,
                       help="checkpoint from `medidiff fit` or `export`, or a shipped demo model's name (`medidiff "
                            "models` lists them); fusion with a classical --method needs none")
    infer.add_argument("--input", required=True, help="a scan, a DICOM series folder, or a folder of scans")
    infer.add_argument("--input-b", help="fusion: the second source (a file, or a folder paired by file name)")
    infer.add_argument("--output", type=Path, required=True, help="folder for the results")
    infer.add_argument("--method", default="diffusion", choices=("diffusion", *CLASSICAL_METHODS),
                       help="fusion: the diffusion prior (--ckpt) or a classical baseline")
    infer.add_argument("--sampler", default=None, help="sampler name (default: the checkpoint's)")
    infer.add_argument("--steps", type=int, default=None,
                       help="sampler steps (default: the checkpoint's, the count that scored best on validation)")
    infer.add_argument("--grid", default=None, type=_grid, metavar="NAME|SIGMA,SIGMA,...",
                       help="sigma grid: karras, exponential, trailing, leading, linspace, or the noise levels "
                            "themselves, high to low (e.g. 1000,0.3: 2 steps); default: the checkpoint's")
    infer.add_argument("--ensemble", type=int, default=1, help="samples per case, drawn as one batch")
    infer.add_argument("--fusion", default="mean", choices=("mean", "vote", "staple"),
                       help="how ensemble members become one label map")
    infer.add_argument("--flips", type=int, default=1,
                       help="segmentation: draw the ensemble for each of N flips of the image (test-time "
                            "augmentation, flipped back; up to 4 in 2D, 8 in 3D)")
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    infer.add_argument("--mask", type=Path, default=None,
                       help="restoration: k-space sampling mask (NIfTI/PNG, 0/1 over the last two axes) of the input")
    infer.add_argument("--no-consistency", action="store_true",
                       help="restoration, superres: skip the data-consistency step (to measure what it adds)")
    infer.add_argument("--channel", type=int, default=None,
                       help="take this channel of a multi-channel file where the model takes one")
    infer.add_argument("--luma", action="store_true", help="take the luma of a colour file where the model takes one")
    infer.add_argument("--allow", nargs="+", default=[], choices=ALLOW, metavar="CHECK",
                       help=f"run on inputs that fail these checks against the training data: {', '.join(ALLOW)}")

    evaluate = sub.add_parser("evaluate", help="score predictions against references, file to file")
    evaluate.add_argument("--task", choices=TASK_NAMES, required=True)
    evaluate.add_argument("--pred", type=Path, help="a prediction file, or a folder of them")
    evaluate.add_argument("--ref", type=Path,
                          help="a reference file, or a folder (segmentation, restoration, superres)")
    evaluate.add_argument("--pairs", type=Path,
                          help="CSV with a header naming pred,ref[,region] (fusion pred,source_a,source_b) and one "
                               "row per case, instead of folders paired by case name")
    evaluate.add_argument("--card", help="data card of the references (a name or a card file): label names and how "
                                         "their files are read (channel, threshold, remap), intensity range")
    evaluate.add_argument("--by-value", action="store_true",
                          help="segmentation: compare the stored integers as they are, even where the predictions' "
                               "labels.json names their classes (recorded in the results)")
    evaluate.add_argument("--region", type=Path, help="region mask(s) (e.g. DRIVE field of view): file or folder")
    evaluate.add_argument("--source-a", type=Path, help="fusion: first source (file or folder)")
    evaluate.add_argument("--source-b", type=Path, help="fusion: second source (file or folder)")
    evaluate.add_argument("--uncertainty", action="store_true",
                          help="segmentation: also score prob/, entropy/ (and members/) beside the predictions: "
                               "ECE, Brier, NLL, error AUROC, AURC, UEO (GED with members/)")
    evaluate.add_argument("--rater", type=Path, action="append", default=[],
                          help="segmentation: another observer's references (repeatable): GED and the AUROC of the "
                               "uncertainty where observers disagree")
    evaluate.add_argument("--nsd-tolerance", type=float, default=1.0,
                          help="segmentation: tolerance of the normalised surface Dice, in mm (pixels for 2D images)")
    evaluate.add_argument("--data-range", type=float, default=None,
                          help="image tasks: intensity range (default: the card's window, else each reference's range)")
    evaluate.add_argument("--out", type=Path, required=True, help="JSON file with per-case rows and a summary")

    sub.add_parser("models", help="list the shipped demo models and what each was trained on")

    demo = sub.add_parser("demo", help="run every task's shipped model on the shipped sample scans")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for outputs and report.md")
    demo.add_argument("--steps", type=int, default=10, help="sampler steps (NFE) for every task")
    demo.add_argument("--ensemble", type=int, default=3, help="ensemble size for segmentation")
    demo.add_argument("--only", nargs="*", default=None, help="run only these tasks")

    plot = sub.add_parser("plot-logs", help="training curves (PNG) from a Lightning metrics.csv")
    plot.add_argument("log", type=Path, help="metrics.csv of a run (runs/.../lightning_logs/version_N/metrics.csv)")
    plot.add_argument("--out", type=Path, default=None, help="PNG to write (default: beside the log)")

    export = sub.add_parser("export", help="shrink a training checkpoint to weights, settings and its contract")
    export.add_argument("--ckpt", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--refresh-contract", action="store_true",
                        help="rebuild the model-input contract from the card's training files (older checkpoints)")
    export.add_argument("--validate-steps", type=int, nargs="+", default=None, metavar="STEPS",
                        help="score these sampler step counts on the card's validation split and record the best")
    return parser


def run_command(argv: Sequence[str]) -> None:
    args = _parser().parse_args(list(argv))
    {"infer": _infer, "evaluate": _evaluate, "export": _export, "demo": _demo, "models": _models,
     "plot-logs": _plot_logs}[args.command](args)


def _plot_logs(args: argparse.Namespace) -> None:
    from medidiff.report import plot_logs

    print(f"wrote {plot_logs(args.log, args.out or args.log.with_suffix('.png'))}")


def _demo(args: argparse.Namespace) -> None:
    from medidiff.demo import run_demo

    run_demo(args.out, steps=args.steps, ensemble=args.ensemble, only=args.only)


def _infer(args: argparse.Namespace) -> None:
    from medidiff.inference import InputOptions, from_checkpoint, infer

    _check_infer_options(args)
    inputs = {"image": args.input} if args.task != "fusion" else {"source_a": args.input, "source_b": args.input_b}
    options = InputOptions(allow=frozenset(args.allow), channel=args.channel, luma=args.luma)
    if not (args.task == "fusion" and args.method != "diffusion"):
        args.ckpt = checkpoint_path(args.ckpt, args.task)
    task_options = {"mask": args.mask} if args.task == "restoration" else {}
    task_options |= {"method": args.method} if args.task == "fusion" else {}
    adapter = from_checkpoint(args.task, args.ckpt, device=args.device, sampler=args.sampler, steps=args.steps,
                              grid=args.grid, ensemble=args.ensemble, seed=args.seed, fusion=args.fusion,
                              flips=args.flips, consistency=not args.no_consistency, **task_options)
    _check_degradation(adapter, args)
    with _progress_bars() as (factory, console):
        written = infer(adapter, inputs, args.output, options=options, report=console, progress_factory=factory)
    print(f"wrote {len(written)} files to {args.output}")


def _check_degradation(adapter, args: argparse.Namespace) -> None:
    """A k-space model needs the sampling mask, always: without it there is no measurement to stay consistent
    with, and the network alone invents structure. A mask means nothing to a model trained on other
    degradations (``--allow degradation`` runs it anyway)."""
    if args.task != "restoration":
        return
    trained = adapter.contract.get("degradation") or {}
    if "kspace" in trained and args.mask is None:
        raise MedidiffError(f"the model reconstructs k-space-undersampled images (trained on {trained}) and needs "
                            "the input's sampling mask: give it with --mask (no override: without the measurement "
                            "the model invents structure)", args.ckpt)
    if "kspace" not in trained and args.mask is not None and "degradation" not in args.allow:
        raise MedidiffError(f"--mask is for models trained on k-space undersampling; this one was trained on "
                            f"{trained or 'an unrecorded degradation'} (run it anyway with --allow degradation)",
                            args.ckpt)


def _progress_bars():
    import contextlib

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bars():
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn()) as progress:
            def factory(case: str):
                bar = progress.add_task(case, total=None)
                return lambda done, total: progress.update(bar, completed=done, total=total)

            yield factory, progress.console.print

    return bars()


# the models `medidiff demo` runs, trained on the shipped sample (medidiff/weights, tasks/train_demo_models.sh):
# used only when named, `--ckpt segmentation_mni_2d`
SHIPPED = {"segmentation": ("segmentation_mni_2d", "segmentation_ct_3d"), "restoration": ("restoration_mni_2d",),
           "superres": ("superres_ct_3d",), "fusion": ("fusion_mni_2d",)}


def checkpoint_path(value: str | None, task: str) -> Path:
    """``--ckpt``: a checkpoint file, or the name of a shipped model. Never chosen for the user: a model picked by
    modality alone labelled an abdominal MR with brain tissue classes."""
    from medidiff.demo import weights

    if value is None:
        raise MedidiffError(f"give the model with --ckpt: a checkpoint of yours, or a shipped demo model by name "
                            f"({', '.join(SHIPPED[task])}; `medidiff models` says what each was trained on)")
    if value in (name for names in SHIPPED.values() for name in names):
        return weights(value)
    path = Path(value)
    if not path.exists():
        raise MedidiffError("checkpoint not found (nor is it a shipped model's name; `medidiff models` lists them)",
                            path)
    return path


def _models(args: argparse.Namespace) -> None:
    """What each shipped model was trained on, so that one is chosen knowingly."""
    from medidiff.checkpoint import load_module
    from medidiff.demo import weights
    from medidiff.inference.contract import describe

    for task, names in SHIPPED.items():
        for name in names:
            contract = load_module(weights(name), task=task)[0].contract
            licence = _first_sentence((contract.get("card") or {}).get("licence", ""))
            print(f"{name}  [{task}, {contract['spatial_dims']}D]\n    {describe(contract)}\n    training data "
                  f"licence: {licence}\n    use: medidiff infer --task {task} --ckpt {name} ...")
    print("Demonstration models trained for minutes on the shipped samples: for trying the commands, not for "
          "research or clinical use.")


def _first_sentence(text: str) -> str:
    sentence = " ".join(str(text).split()).split(". ")[0]
    return sentence if len(sentence) <= 200 else sentence[:197] + "..."


def _check_infer_options(args: argparse.Namespace) -> None:
    """Refuse bad options before any model is loaded or file written."""
    import torch

    from medidiff.arguments import MAX_ENSEMBLE, MAX_STEPS
    from medidiff.core import SAMPLERS

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise MedidiffError(f"--sampler {args.sampler!r} is unknown; choose one of {', '.join(sorted(SAMPLERS))}")
    if args.flips != 1 and args.task != "segmentation":
        raise MedidiffError(f"--flips applies to segmentation, not {args.task}")
    for option, most in (("steps", MAX_STEPS), ("ensemble", MAX_ENSEMBLE), ("flips", 8)):
        value = getattr(args, option)
        if value is not None and not 1 <= value <= most:
            raise MedidiffError(f"--{option} must be at least 1 and at most {most}, got {value}")
    if not 0 <= args.seed < 2**63:
        raise MedidiffError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.no_consistency and args.task not in ("restoration", "superres"):
        raise MedidiffError(f"--no-consistency applies to restoration and superres, not {args.task}")
    if args.task == "fusion" and not args.input_b:
        raise MedidiffError("fusion needs two sources: --input (source A) and --input-b (source B)")
    if args.task != "fusion" and (args.input_b or args.method != "diffusion"):
        raise MedidiffError(f"--input-b and --method apply to fusion, not {args.task}")
    if args.mask is not None and args.task != "restoration":
        raise MedidiffError(f"--mask applies to restoration, not {args.task}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise MedidiffError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedidiffError(f"--device {args.device}: CUDA is not available on this machine")


def _evaluate(args: argparse.Namespace) -> None:
    from medidiff.metrics import evaluate as E

    if args.pairs is None and args.pred is None:
        raise MedidiffError("give the predictions with --pred (a file or folder) or a --pairs file")
    if args.by_value and args.task != "segmentation":
        raise MedidiffError(f"--by-value applies to segmentation, not {args.task}")
    E.check_nsd_tolerance(args.nsd_tolerance)  # options first: before the card or any file is read
    if args.task == "fusion":
        if args.pairs is None and not (args.source_a and args.source_b):
            raise MedidiffError("fusion evaluation needs --source-a and --source-b (or a --pairs file)")
        result = E.evaluate_fusion(args.pred, args.source_a, args.source_b, out_json=args.out, pairs=args.pairs)
    elif args.ref is None and args.pairs is None:
        raise MedidiffError(f"{args.task} evaluation needs --ref (or a --pairs file)")
    elif args.task == "segmentation":
        result = E.evaluate_segmentation(args.pred, args.ref, card=_card_labels(args.card), region_dir=args.region,
                                         pred_labels=E.prediction_labels(args.pred), by_value=args.by_value,
                                         uncertainty=args.uncertainty, raters=args.rater,
                                         nsd_tolerance=args.nsd_tolerance, pairs=args.pairs, out_json=args.out)
    else:
        data_range = args.data_range if args.data_range is not None else _card_range(args.card)
        result = E.evaluate_image(args.pred, args.ref, data_range=data_range, pairs=args.pairs, out_json=args.out)
    for metric, stats in result["summary"].items():
        print(f"{metric:24s} mean {stats['mean']:.4f}  std {stats['std']:.4f}  n {stats['n']}")
    print(f"per-case results: {args.out}")


def _card_labels(card_name: str | None):
    """The references' card (a name or a card file; its data need not be present), which names their classes and
    says how their files are read; None without --card."""
    if card_name is None:
        return None
    from medidiff.data.cards import load_card

    card = load_card(card_name, check_files=False)
    if not card.labels:
        raise MedidiffError("names no labels, so it cannot say what the references' values are; segmentation "
                            "evaluation needs a card with labels", card.path)
    return card


def _card_range(card_name: str | None) -> float | None:
    """The intensity range of the card's image scale: its window's width (None for percentile cards)."""
    if card_name is None:
        return None
    from medidiff.data.cards import load_card

    card = load_card(card_name, check_files=False)
    if "image" not in card.inputs:  # a fusion card names source_a / source_b: no single image scale
        raise MedidiffError(f"has no 'image' input (its inputs: {', '.join(card.inputs)}), so it gives no intensity "
                            "range; give --data-range", card.path)
    norm = card.inputs["image"].normalise
    return float(norm["high"]) - float(norm["low"]) if norm["method"] == "window" else None


def _export(args: argparse.Namespace) -> None:
    from medidiff.checkpoint import export, load_module

    module, data_hparams = load_module(args.ckpt)
    if args.refresh_contract or args.validate_steps:
        from medidiff.checkpoint import refresh_contract

        contract = refresh_contract(module, data_hparams, args.validate_steps)
        print(f"contract: sampling {contract['sampling']}")
    path = export(module, data_hparams, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
