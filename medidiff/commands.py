"""medidiff's own commands: ``infer``, ``evaluate``, ``export``, ``models``, ``demo`` and ``plot-logs`` (LightningCLI
handles ``fit`` and ``validate``). Every task comes from :data:`medidiff.tasks.REGISTRY`, with its own options."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence, get_args

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from medidiff.arguments import MAX_ENSEMBLE, MAX_STEPS
from medidiff.core import SAMPLERS
from medidiff.core.denoiser import SigmaGrid
from medidiff.demo import run_demo, weights
from medidiff.errors import MedidiffError
from medidiff.inference import InputOptions, from_checkpoint, infer
from medidiff.inference.contract import ALLOW, describe
from medidiff.lit.registry import export, load_system, validate_steps
from medidiff.report import plot_logs
from medidiff.tasks import REGISTRY, Option, task_class

# the models `medidiff demo` runs, trained on the shipped sample (medidiff/weights, tasks/train_demo_models.sh):
# used only when named, `--ckpt segmentation_mni_2d`
SHIPPED = ("segmentation_mni_2d", "segmentation_ct_3d", "restoration_mni_2d", "superres_ct_3d", "fusion_mni_2d")


def _grid(text: str) -> str | list[float]:
    """``--grid``: a named spacing, or comma-separated noise levels."""

    names = get_args(SigmaGrid)
    if text in names:
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a grid name ({', '.join(names)}) nor "
                                         "comma-separated noise levels") from None


def task_options(kind: str) -> dict[tuple[str, ...], tuple[Option, list[str]]]:
    """Every task's options of one command (``options`` or ``evaluate_options``), once each, with their tasks."""
    found: dict[tuple[str, ...], tuple[Option, list[str]]] = {}
    for name, cls in REGISTRY.items():
        for option in getattr(cls, kind):
            found.setdefault(option.flags, (option, []))[1].append(name)
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medidiff", description="Conditional diffusion for medical imaging. "
                                     "Training: medidiff fit|validate --config CONFIG.yaml")
    sub = parser.add_subparsers(dest="command", required=True)
    _infer_parser(sub.add_parser("infer", help="run a trained model on a scan or a folder of scans"))
    _evaluate_parser(sub.add_parser("evaluate", help="score predictions against references, file to file"))
    sub.add_parser("models", help="list the shipped demo models and what each was trained on")
    demo = sub.add_parser("demo", help="run every task's shipped model on the shipped sample scans")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for outputs and report.md")
    demo.add_argument("--steps", type=int, default=10, help="sampler steps (NFE) for every task")
    demo.add_argument("--ensemble", type=int, default=3, help="ensemble size for segmentation")
    demo.add_argument("--only", nargs="*", default=None, help="run only these parts of the demo")
    plot = sub.add_parser("plot-logs", help="training curves (PNG) from a Lightning metrics.csv")
    plot.add_argument("log", type=Path, help="metrics.csv of a run (runs/.../lightning_logs/version_N/metrics.csv)")
    plot.add_argument("--out", type=Path, default=None, help="PNG to write (default: beside the log)")
    export = sub.add_parser("export", help="shrink a training checkpoint to weights, settings and its contract")
    export.add_argument("--ckpt", type=Path, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--validate-steps", type=int, nargs="+", default=None, metavar="STEPS",
                        help="score these sampler step counts on the card's validation split and record the best")
    return parser


def _infer_parser(infer: argparse.ArgumentParser) -> None:
    infer.add_argument("--task", choices=list(REGISTRY), required=True)
    infer.add_argument("--ckpt", default=None,
                       help="checkpoint from `medidiff fit` or `export`, or a shipped demo model's name (`medidiff "
                            "models` lists them); fusion with a classical --method needs none")
    infer.add_argument("--input", required=True, help="a scan, a DICOM series folder, or a folder of scans")
    infer.add_argument("--input-b", help="tasks of two sources (fusion): the second (a file, or a folder paired by "
                                         "file name)")
    infer.add_argument("--output", type=Path, required=True, help="folder for the results")
    infer.add_argument("--sampler", default=None, help="sampler name (default: the checkpoint's)")
    infer.add_argument("--steps", type=int, default=None,
                       help="sampler steps (default: the checkpoint's, the count that scored best on validation)")
    infer.add_argument("--grid", default=None, type=_grid, metavar="NAME|SIGMA,SIGMA,...",
                       help="sigma grid: karras, exponential, trailing, leading, linspace, or the noise levels "
                            "themselves, high to low (e.g. 1000,0.3: 2 steps); default: the checkpoint's")
    infer.add_argument("--ensemble", type=int, default=1, help="samples per case, drawn as one batch")
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    infer.add_argument("--channel", type=int, default=None,
                       help="take this channel of a multi-channel file where the model takes one")
    infer.add_argument("--luma", action="store_true", help="take the luma of a colour file where the model takes one")
    infer.add_argument("--allow", nargs="+", default=[], choices=ALLOW, metavar="CHECK",
                       help=f"run on inputs that fail these checks against the training data: {', '.join(ALLOW)}")
    for option, _ in task_options("options").values():
        infer.add_argument(*option.flags, **option.kwargs)


def _evaluate_parser(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--task", choices=list(REGISTRY), required=True)
    evaluate.add_argument("--pred", type=Path, help="a prediction file, or a folder of them")
    evaluate.add_argument("--ref", type=Path, help="a reference file, or a folder")
    evaluate.add_argument("--pairs", type=Path,
                          help="CSV with a header naming pred,ref[,region] (fusion pred,source_a,source_b) and one "
                               "row per case, instead of folders paired by case name")
    evaluate.add_argument("--card", help="data card of the references (a name or a card file): label names and how "
                                         "their files are read (channel, threshold, remap), intensity range, file "
                                         "name suffixes")
    for option, _ in task_options("evaluate_options").values():
        evaluate.add_argument(*option.flags, **option.kwargs)
    evaluate.add_argument("--out", type=Path, required=True, help="JSON file with per-case rows and a summary")


def run_command(argv: Sequence[str]) -> None:
    args = _parser().parse_args(list(argv))
    {"infer": _infer, "evaluate": _evaluate, "export": _export, "demo": _demo, "models": _models,
     "plot-logs": _plot_logs}[args.command](args)


def refuse_foreign_options(args: argparse.Namespace, kind: str) -> None:
    """An option another task owns, given for this one, is one line (nothing is run or written)."""
    for option, owners in task_options(kind).values():
        if args.task not in owners and getattr(args, option.dest) != option.default:
            raise MedidiffError(f"{option.flags[0]} applies to {' and '.join(owners)}, not {args.task}")


# ------------------------------------------------------------------------------------------------- infer


def _infer(args: argparse.Namespace) -> None:
    cls = task_class(args.task)
    _check_infer_options(args, cls)
    inputs = dict(zip(cls.roles, (args.input, args.input_b)))
    options = {option.dest: getattr(args, option.dest) for option in cls.options} | {"allow": tuple(args.allow)}
    if options.get("method", "diffusion") == "diffusion":
        args.ckpt = checkpoint_path(args.ckpt)
    model = from_checkpoint(args.task, args.ckpt, device=args.device, sampler=args.sampler, steps=args.steps,
                            grid=args.grid, ensemble=args.ensemble, seed=args.seed, **options)
    with _progress_bars() as (factory, console):
        written = infer(model, inputs, args.output, options=InputOptions(frozenset(args.allow), args.channel,
                                                                          args.luma),
                        report=console, progress_factory=factory)
    print(f"wrote {len(written)} files to {args.output}")


def _check_infer_options(args: argparse.Namespace, cls: Any) -> None:
    """Refuse bad options before any model is loaded or file written."""

    refuse_foreign_options(args, "options")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise MedidiffError(f"--sampler {args.sampler!r} is unknown; choose one of {', '.join(sorted(SAMPLERS))}")
    for option, most in (("steps", MAX_STEPS), ("ensemble", MAX_ENSEMBLE)):
        value = getattr(args, option)
        if value is not None and not 1 <= value <= most:
            raise MedidiffError(f"--{option} must be at least 1 and at most {most}, got {value}")
    if not 0 <= args.seed < 2**63:
        raise MedidiffError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if len(cls.roles) == 2 and not args.input_b:
        raise MedidiffError(f"{cls.name} needs two sources: --input (source A) and --input-b (source B)")
    if len(cls.roles) == 1 and args.input_b:
        twos = [name for name, other in REGISTRY.items() if len(other.roles) == 2]
        raise MedidiffError(f"--input-b applies to {' and '.join(twos)}, not {args.task}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise MedidiffError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedidiffError(f"--device {args.device}: CUDA is not available on this machine")


@contextlib.contextmanager
def _progress_bars() -> Iterator[tuple[Any, Any]]:
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn()) as progress:
        def factory(case: str):
            bar = progress.add_task(case, total=None)
            return lambda done, total: progress.update(bar, completed=done, total=total)

        yield factory, progress.console.print


def checkpoint_path(value: str | None) -> Path:
    """``--ckpt``: a checkpoint file, or the name of a shipped model. Never chosen for the user: a model picked by
    modality alone labelled an abdominal MR with brain tissue classes."""
    if value is None:
        raise MedidiffError(f"give the model with --ckpt: a checkpoint of yours, or a shipped demo model by name "
                            f"({', '.join(SHIPPED)}; `medidiff models` says what each was trained on)")
    if value in SHIPPED:
        return weights(value)
    path = Path(value)
    if not path.exists():
        raise MedidiffError("checkpoint not found (nor is it a shipped model's name; `medidiff models` lists them)",
                            path)
    return path


# ------------------------------------------------------------------------------------------- others


def _evaluate(args: argparse.Namespace) -> None:
    if args.pairs is None and args.pred is None:
        raise MedidiffError("give the predictions with --pred (a file or folder) or a --pairs file")
    refuse_foreign_options(args, "evaluate_options")
    result = task_class(args.task).evaluate(args)
    for metric, stats in result["summary"].items():
        print(f"{metric:24s} mean {stats['mean']:.4f}  std {stats['std']:.4f}  n {stats['n']}")
    print(f"per-case results: {args.out}")


def _models(args: argparse.Namespace) -> None:
    """What each shipped model was trained on, so that one is chosen knowingly."""
    for name in SHIPPED:
        system, _ = load_system(weights(name))
        contract, task = system.contract, system.task.name
        licence = _first_sentence((contract.get("card") or {}).get("licence", ""))
        print(f"{name}  [{task}, {contract['spatial_dims']}D]\n    {describe(contract)}\n    training data "
              f"licence: {licence}\n    use: medidiff infer --task {task} --ckpt {name} ...")
    print("Demonstration models trained for minutes on the shipped samples: for trying the commands, not for "
          "research or clinical use.")


def _first_sentence(text: str) -> str:
    sentence = " ".join(str(text).split()).split(". ")[0]
    return sentence if len(sentence) <= 200 else sentence[:197] + "..."


def _export(args: argparse.Namespace) -> None:
    system, data_settings = load_system(args.ckpt)
    if args.validate_steps:
        contract = validate_steps(system, data_settings, args.validate_steps)
        print(f"contract: sampling {contract['sampling']}")
    path = export(system, data_settings, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _plot_logs(args: argparse.Namespace) -> None:
    print(f"wrote {plot_logs(args.log, args.out or args.log.with_suffix('.png'))}")


def _demo(args: argparse.Namespace) -> None:
    run_demo(args.out, steps=args.steps, ensemble=args.ensemble, only=args.only)
