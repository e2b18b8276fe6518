"""Results tables from the command line's own paths: every row is ``medidiff infer`` + ``medidiff evaluate``.

Used by the ``tasks/*/results.py`` scripts, so a table in a task README is produced by exactly the commands a
user runs. A row whose predictions are complete is not inferred again (re-running a script only re-scores).
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from medidiff.errors import MedidiffError


@dataclass
class Row:
    """One table row: a checkpoint run over an input folder with some infer arguments (or no checkpoint: the
    inputs themselves are scored, e.g. the degraded input or a classical baseline written beforehand)."""

    name: str
    inputs: Path
    ckpt: Path | None = None
    infer_args: list[str] = field(default_factory=list)
    note: str = ""


def task_script(relative: str):
    """A results script of the repository (e.g. ``tasks/restoration/results.py``) loaded as a module, so that a
    benchmark uses its held-aside cases and row runner instead of copying them."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def distillation_arguments(doc: str, default_out: str) -> argparse.Namespace:
    """The command line of the distillation benchmarks: ``--teacher CKPT --student [LABEL=]CKPT [--student ...]
    [--unet CKPT] [--out DIR] [--teacher-nfe N,N] [--student-nfe N,N]``; ``students`` holds ``(label, path)``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", action="append", required=True, metavar="[LABEL=]CKPT",
                        help="a student checkpoint; rows LABEL_nfe<N> (default label: student)")
    parser.add_argument("--unet", type=Path, help="the task's regression UNet, for time per case")
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--teacher-nfe", default="1,2,5,10")
    parser.add_argument("--student-nfe", default="1,2")
    args = parser.parse_args()
    args.students = labelled_checkpoints(args.student, "student")
    return args


def training_steps(args: argparse.Namespace) -> dict[str, int]:
    """Training steps of the teacher and of each student (distillation steps), read from the checkpoints."""
    from medidiff.checkpoint import read_checkpoint

    checkpoints = [("teacher", args.teacher), *args.students]
    steps = {label: read_checkpoint(ckpt)["global_step"] for label, ckpt in checkpoints}
    print(f"\ntraining steps (students: distillation steps): {steps}")
    return steps


def machine() -> str:
    """The machine a figure was measured on, for every row of a table."""
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def infer_unless_complete(task: str, ckpt: Path, inputs: Path, pred: Path, infer_args: list[str]) -> float:
    """Run ``medidiff infer`` over the folder ``inputs`` unless every case already has its provenance file; returns
    the sum of the per-case times recorded there (read, sample, write; model loading excluded)."""
    from medidiff.cli import main as medidiff

    cases = len([p for p in inputs.iterdir() if p.is_file()])
    if len(list((pred / "provenance").glob("*.json"))) < cases:
        if medidiff(["infer", "--task", task, "--ckpt", str(ckpt), "--input", str(inputs), "--output", str(pred),
                     *infer_args]):
            raise MedidiffError(f"infer failed for {pred.name}")
    return sum(json.loads(p.read_text())["seconds"] for p in (pred / "provenance").glob("*.json"))


def run_image_row(task: str, row: Row, out: Path, ref: Path, data_range: float) -> dict:
    """Infer (unless complete) and evaluate one image-task row (time: see :func:`infer_unless_complete`)."""
    from medidiff.cli import main as medidiff

    pred, seconds = row.inputs, 0.0
    if row.ckpt is not None:
        pred = out / row.name
        seconds = infer_unless_complete(task, row.ckpt, row.inputs, pred, row.infer_args)
    metrics = out / f"{row.name}.json"
    if medidiff(["evaluate", "--task", task, "--pred", str(pred), "--ref", str(ref), "--data-range",
                 str(data_range), "--out", str(metrics)]):
        raise MedidiffError(f"evaluate failed for row {row.name}")
    summary = json.loads(metrics.read_text())["summary"]
    return {"row": row.name, "args": " ".join(row.infer_args), "note": row.note, "seconds": seconds,
            **{name: summary[name]["mean"] for name in ("psnr", "ssim", "nmse", "mae") if name in summary},
            "n": summary["psnr"]["n"]}


def image_table(rows: list[dict]) -> str:
    """Markdown table of image-task rows."""
    lines = ["| row | infer arguments | n | PSNR | SSIM | NMSE | wall time | machine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        args = f"`{r['args']}`" if r["args"] else r["note"] or "—"
        time = f"{r['seconds']:.0f} s" if r["seconds"] else "—"
        lines.append(f"| {r['row']} | {args} | {r['n']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['nmse']:.4f} | "
                     f"{time} | {machine()} |")
    return "\n".join(lines)


UNCERTAINTY_METRICS = ("dice_mean", "nsd_mean", "hd95_mean", "ece", "brier", "nll", "error_auroc", "aurc", "ueo",
                       "ged", "disagreement_auroc")
UNCERTAINTY_HEADER = ("Dice", "NSD", "HD95", "ECE", "Brier", "NLL", "err AUROC", "AURC", "UEO", "GED",
                      "disagree AUROC")


def evaluate_segmentation(pred: Path, ref: Path, out: Path, card: str, *, region: Path | None = None,
                          raters: tuple[Path, ...] = (), uncertainty: bool = True) -> dict[str, float]:
    """``medidiff evaluate --task segmentation [--uncertainty] [--rater ...]``; the summary means."""
    from medidiff.cli import main as medidiff

    argv = ["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(ref), "--card", card,
            "--out", str(out)]
    argv += ["--region", str(region)] if region is not None else []
    argv += ["--uncertainty"] if uncertainty else []
    for rater in raters:
        argv += ["--rater", str(rater)]
    if medidiff(argv):
        raise MedidiffError(f"evaluate failed for {pred}")
    summary = json.loads(out.read_text())["summary"]
    return {k: summary[k]["mean"] for k in UNCERTAINTY_METRICS if k in summary}


def uncertainty_table(rows: list[dict], where: str, time_label: str) -> str:
    """Markdown: one line per row of :func:`evaluate_segmentation` results (``row``, ``args``, ``seconds``)."""
    lines = ["| row | infer arguments | " + " | ".join(UNCERTAINTY_HEADER) + f" | {time_label} | machine |",
             "|---|---|" + "---|" * len(UNCERTAINTY_HEADER) + "---|---|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) and r[k] == r[k] else "–"
                 for k in UNCERTAINTY_METRICS]
        lines.append(f"| {r['row']} | `{r['args'] or '(defaults)'}` | " + " | ".join(cells) +
                     f" | {r['seconds']:.0f} s | {where} |")
    return "\n".join(lines)


def labelled_checkpoints(entries: list[str], default: str) -> list[tuple[str, Path]]:
    """``[LABEL=]CKPT`` command-line entries as ``(label, path)``."""
    pairs = []
    for entry in entries:
        label, _, path = entry.rpartition("=")
        pairs.append((label or default, Path(path)))
    return pairs


def sampling_plan(label: str, ckpt: Path, steps: tuple[int, ...], ensembles: tuple[int, ...],
                  members: int = 4) -> list[tuple[str, Path, list[str]]]:
    """Rows ``LABEL_nfe<N>`` for each step count, and ``LABEL_nfe<N>_ens<members>`` for those in ``ensembles``."""
    plan = [(f"{label}_nfe{n}", ckpt, ["--steps", str(n)]) for n in steps]
    return plan + [(f"{label}_nfe{n}_ens{members}", ckpt, ["--steps", str(n), "--ensemble", str(members)])
                   for n in ensembles]


def unet_and_residual_plan(unet: Path | None, predictor: Path | None, residuals: list[str], steps: tuple[int, ...],
                           ensembles: tuple[int, ...], baselines: Sequence[tuple[str, Path, list[str]]] = ()
                           ) -> list[tuple[str, Path, list[str]]]:
    """The UNet alone and with 4 flips, its step-k predictor checkpoint, further ``baselines`` (each if given),
    then each ``[LABEL=]CKPT`` residual model's :func:`sampling_plan`: the rows the uncertainty tables share."""
    plan = [("unet", unet, []), ("unet_tta4", unet, ["--ensemble", "4"])] if unet else []
    plan += [("predictor_unet", predictor, [])] if predictor else []
    plan += list(baselines)
    for label, ckpt in labelled_checkpoints(residuals, "residual"):
        plan += sampling_plan(label, ckpt, steps, ensembles)
    return plan


def run_uncertainty_rows(plan: list[tuple[str, Path, list[str]]], inputs: Path, ref: Path, out: Path, card: str,
                         **evaluate: Any) -> list[dict]:
    """Infer (unless complete) and :func:`evaluate_segmentation` every ``(name, ckpt, infer_args)`` of ``plan``."""
    rows = []
    for name, ckpt, infer_args in plan:
        seconds = infer_unless_complete("segmentation", ckpt, inputs, out / name, infer_args)
        rows.append({"row": name, "args": " ".join(infer_args), "seconds": seconds,
                     **evaluate_segmentation(out / name, ref, out / f"{name}.json", card, **evaluate)})
    return rows
