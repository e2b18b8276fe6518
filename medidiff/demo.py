"""``medidiff demo``: every task's shipped model on the shipped sample scans, evaluated, with pictures.

Each task prepares its inputs from ``medidiff/sample_data`` (degradations simulated with a fixed seed, held-out
slices or cases only), runs the same inference code as ``medidiff infer``, scores the result with the same
code as ``medidiff evaluate``, and draws a panel. ``report.md`` collects the table and the pictures.
"""

from __future__ import annotations

import platform
import time
from importlib import resources
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch
from PIL import Image

import medidiff
from medidiff import io
from medidiff.core.operators import downsample, kspace_mask, undersample
from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.inference import InputOptions, SamplingOptions, from_checkpoint, infer
from medidiff.inference.model import Model
from medidiff.lit.registry import load_system
from medidiff.metrics import evaluate as E
from medidiff.report import markdown_table, middle_slice, panel

SAMPLES = Path(str(resources.files("medidiff") / "sample_data"))
WEIGHTS = Path(str(resources.files("medidiff") / "weights"))
HELD_OUT_SLAB = (58, 70)  # axial slices of the 2 mm MNI sample never seen in training (see its card)


def _run(task: str, name: str, inputs: dict, out: Path, options: SamplingOptions, log,
         allow: frozenset[str] = frozenset(), **task_options) -> None:
    """``medidiff infer`` on a shipped model, with the demo's fixed sampling options."""
    system, _ = load_system(weights(name), task=task)
    task_options = {**task_options, "contract": system.contract, "allow": tuple(allow)}
    system.task.prepare(system, system.contract, task_options, weights(name))
    model = Model(system, system.task, system.contract, options, task_options, str(weights(name)))
    infer(model, inputs, out, options=InputOptions(allow=allow), report=log)


def weights(name: str) -> Path:
    path = WEIGHTS / f"{name}.ckpt"
    if not path.is_file():
        raise MedidiffError(f"shipped model '{name}' is missing; train it with tasks/train_demo_models.sh", path)
    return path


def _slab(source: Path, target: Path) -> Path:
    """Held-out axial slab of a volume, written with its own (shifted) affine."""
    image = nib.load(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image.slicer[:, :, HELD_OUT_SLAB[0]:HELD_OUT_SLAB[1]], target)
    return target


def _volume(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj).astype(np.float32)


def segmentation_2d(out: Path, options: SamplingOptions, log: Callable[[str], None]) -> dict:
    inputs, refs, pred = out / "inputs" / "seg2d", out / "refs" / "seg2d", out / "segmentation_2d"
    scan = _slab(SAMPLES / "mni152/t1_2mm.nii.gz", inputs / "mni.nii.gz")
    _slab(SAMPLES / "mni152/tissue_2mm.nii.gz", refs / "mni.nii.gz")
    _run("segmentation", "segmentation_mni_2d", {"image": inputs}, pred, options, log)
    result = E.evaluate_segmentation(pred, refs, labels={"grey_matter": 1, "white_matter": 2},
                                     out_json=out / "metrics" / "segmentation_2d.json")
    label, entropy = _volume(pred / "mni.nii.gz"), _volume(pred / "entropy" / "mni.nii.gz")
    image_slice = [middle_slice(a) for a in (_volume(scan), label, entropy, _volume(refs / "mni.nii.gz"))]
    picture = panel([("T1 (input)", image_slice[0], "image"), ("diffusion labels", image_slice[1], "label"),
                     ("uncertainty (entropy)", image_slice[2], "uncertainty"), ("reference", image_slice[3], "label")],
                    out / "panels" / "segmentation_2d.png", "MNI152 tissue classes, 2D model, held-out slices")
    return _row("segmentation 2D (MNI GM/WM)", result, {"Dice": "dice_mean", "HD95 mm": "hd95_mean"}, picture)


def segmentation_3d(out: Path, options: SamplingOptions, log: Callable[[str], None]) -> dict:
    inputs, refs, pred = out / "inputs" / "seg3d", out / "refs" / "seg3d", out / "segmentation_3d"
    inputs.mkdir(parents=True, exist_ok=True), refs.mkdir(parents=True, exist_ok=True)
    scan = inputs / "ct_b.nii.gz"
    nib.save(nib.load(SAMPLES / "totalseg_ct/ct_b.nii.gz"), scan)
    nib.save(nib.load(SAMPLES / "totalseg_ct/seg_b.nii.gz"), refs / "ct_b.nii.gz")
    _run("segmentation", "segmentation_ct_3d", {"image": inputs}, pred, options, log)

    card = load_card("sample_ct", check_files=False)
    result = E.evaluate_segmentation(pred, refs, labels=dict(card.labels), label_remap=dict(card.label_remap),
                                     out_json=out / "metrics" / "segmentation_3d.json")
    ref = _volume(refs / "ct_b.nii.gz")
    label = _volume(pred / "ct_b.nii.gz")
    views = [middle_slice(a, weight=label > 0) for a in (_volume(scan), label, _volume(pred / "entropy/ct_b.nii.gz"))]
    remapped = np.vectorize(lambda v: card.label_remap.get(int(v), 0))(middle_slice(ref, weight=label > 0))
    picture = panel([("CT (input)", np.clip(views[0], -200, 300), "image"), ("diffusion labels", views[1], "label"),
                     ("uncertainty", views[2], "uncertainty"), ("reference (model-made)", remapped, "label")],
                    out / "panels" / "segmentation_3d.png", "CT organs, 3D model with sliding windows, held-out case")
    return _row("segmentation 3D (CT organs)", result, {"Dice": "dice_mean", "HD95 mm": "hd95_mean"}, picture)


def restoration(out: Path, options: SamplingOptions, log: Callable[[str], None]) -> dict:
    clean_path = _slab(SAMPLES / "mni152/t1_2mm.nii.gz", out / "refs" / "recon" / "mni.nii.gz")
    clean = nib.load(clean_path)
    volume = torch.from_numpy(_volume(clean_path))
    mask = kspace_mask(volume.shape[:2], 4, 0.08, "random", torch.Generator().manual_seed(0))
    zero_filled, _ = undersample(volume.movedim(-1, 0)[:, None], mask)  # slice by slice
    degraded = zero_filled[:, 0].movedim(0, -1).numpy()
    inputs = out / "inputs" / "recon"
    inputs.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(degraded.astype(np.float32), clean.affine), inputs / "mni.nii.gz")
    mask_path = out / "inputs" / "recon_mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.numpy().astype(np.uint8), np.eye(4)), mask_path)
    pred = out / "restoration"
    _run("restoration", "restoration_mni_2d", {"image": inputs}, pred, options, log, mask=mask_path)
    result = E.evaluate_image(pred, clean_path.parent, data_range=255.0, out_json=out / "metrics" / "restoration.json")
    baseline = E.evaluate_image(inputs, clean_path.parent, data_range=255.0)
    views = [middle_slice(a) for a in (degraded, _volume(pred / "mni.nii.gz"), _volume(clean_path))]
    error = np.abs(views[1] - views[2])
    picture = panel([("zero-filled (4x)", views[0], "image"), ("diffusion + k-space DC", views[1], "image"),
                     ("|error|", error, "uncertainty"), ("reference", views[2], "image")],
                    out / "panels" / "restoration.png", "Undersampled MRI reconstruction, held-out slices")
    row = _row("restoration (MRI k-space 4x)", result, {"PSNR": "psnr", "SSIM": "ssim"}, picture)
    row["baseline"] = _image_baseline("zero-filled input", baseline)
    return row


def superres(out: Path, options: SamplingOptions, log: Callable[[str], None]) -> dict:
    hr_path = out / "refs" / "sr" / "ct_b.nii.gz"
    hr_path.parent.mkdir(parents=True, exist_ok=True)
    hr = nib.load(SAMPLES / "totalseg_ct/ct_b.nii.gz")
    nib.save(hr, hr_path)
    system, _ = load_system(weights("superres_ct_3d"), task="superres")
    factors = [int(f) for f in system.task.factors]

    low = downsample(torch.from_numpy(_volume(hr_path))[None, None], factors)[0, 0].numpy()
    inputs = out / "inputs" / "sr"
    inputs.mkdir(parents=True, exist_ok=True)
    low_affine = io.respaced_affine(hr.affine, tuple(float(z) * f for z, f in zip(hr.header.get_zooms(), factors)))
    nib.save(nib.Nifti1Image(low, low_affine), inputs / "ct_b.nii.gz")
    pred = out / "superres"
    # CT air below -1000 and bone above 1000 HU lie beyond the model's window: allowed by name, as a user would
    _run("superres", "superres_ct_3d", {"image": inputs}, pred, options, log, allow=frozenset({"clipping"}))
    result = E.evaluate_image(pred, hr_path.parent, data_range=2000.0, out_json=out / "metrics" / "superres.json")
    interpolated = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None], scale_factor=factors,
                                                   mode="trilinear")[0, 0].numpy()
    interp_dir = out / "baselines" / "sr_trilinear"
    interp_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(interpolated, hr.affine), interp_dir / "ct_b.nii.gz")
    baseline = E.evaluate_image(interp_dir, hr_path.parent, data_range=2000.0)
    coronal = [np.clip(np.take(a, a.shape[1] // 2, axis=1), -200, 300) for a in
               (interpolated, _volume(pred / "ct_b.nii.gz"), _volume(hr_path))]
    picture = panel([("trilinear from 8 mm", coronal[0], "image"), ("diffusion + consistency", coronal[1], "image"),
                     ("reference 2 mm", coronal[2], "image")], out / "panels" / "superres.png",
                    "Through-plane super-resolution x4 (coronal view)")
    row = _row("super-resolution (CT 8 -> 2 mm)", result, {"PSNR": "psnr", "SSIM": "ssim"}, picture)
    row["baseline"] = _image_baseline("trilinear", baseline)
    return row


def fusion(out: Path, options: SamplingOptions, log: Callable[[str], None]) -> dict:

    cases = ["124", "132"]  # the sample card's test pairs (MNI T1 + simulated PET)
    folders = {kind: out / "inputs" / "fusion" / kind for kind in ("mri", "pet")}
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            Image.open(SAMPLES / "fusion" / kind / f"{case}.png").save(folder / f"{case}.png")
    pred, baseline_dir = out / "fusion", out / "baselines" / "fusion_average"
    pair = {"source_a": folders["mri"], "source_b": folders["pet"]}
    _run("fusion", "fusion_mni_2d", pair, pred, options, log)
    infer(from_checkpoint("fusion", None, method="average"), pair, baseline_dir, report=log)
    result = E.evaluate_fusion(pred, folders["mri"], folders["pet"], out_json=out / "metrics" / "fusion.json")
    baseline = E.evaluate_fusion(baseline_dir, folders["mri"], folders["pet"])
    fused = next(p for p in sorted(pred.iterdir()) if p.suffix == ".png")
    images = [np.asarray(Image.open(path).convert("RGB")) / 255.0 for path in
              (folders["mri"] / f"{cases[0]}.png", folders["pet"] / f"{cases[0]}.png", fused)]
    picture = panel([(caption, np.asarray(image), "rgb") for caption, image in
                     zip(("MRI T1", "simulated PET", "diffusion fusion"), images)],
                    out / "panels" / "fusion.png", "MRI + simulated PET fusion (shipped sample)")
    row = _row("fusion (MRI + simulated PET)", result, {"Qabf": "qabf", "VIF": "vif"}, picture)
    row["baseline"] = (f"average: Qabf {baseline['summary']['qabf']['mean']:.3f}, "
                                f"VIF {baseline['summary']['vif']['mean']:.3f}")
    return row


def _image_baseline(name: str, result: dict) -> str:
    summary = result["summary"]
    return f"{name}: PSNR {summary['psnr']['mean']:.2f}, SSIM {summary['ssim']['mean']:.3f}"


def _row(task: str, result: dict, columns: dict[str, str], picture: Path) -> dict:
    row = {"task": task, "cases": result["summary"][next(iter(columns.values()))]["n"]}
    for label, key in columns.items():
        row[label] = result["summary"][key]["mean"]
    row["picture"] = picture.name
    return row


ENSEMBLES = ("segmentation_2d", "segmentation_3d")  # the parts whose outputs show an ensemble's uncertainty
TASKS = {"segmentation_2d": segmentation_2d, "segmentation_3d": segmentation_3d, "restoration": restoration,
         "superres": superres, "fusion": fusion}


def run_demo(out: str | Path, *, steps: int = 10, ensemble: int = 3, only: list[str] | None = None,
             log: Callable[[str], None] = print) -> Path:
    """Run every task (or ``only`` some), write ``report.md`` in ``out``; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started, rows = time.perf_counter(), []
    for name, task in TASKS.items():
        if only and name not in only:
            continue
        log(f"[demo] {name}")
        task_start = time.perf_counter()
        options = SamplingOptions(sampler="dpmpp_2m", steps=steps, grid="exponential",
                                  ensemble=ensemble if name in ENSEMBLES else 1, seed=0)
        row = task(out, options, log)
        seconds = round(time.perf_counter() - task_start, 1)
        row["NFE"], row["ensemble"], row["seconds"] = steps, options.ensemble, seconds
        rows.append(row)
    total = time.perf_counter() - started
    report = out / "report.md"
    report.write_text(_report_text(rows, total, steps), encoding="utf-8")
    log(f"[demo] finished in {total:.0f} s; report: {report}")
    return report


def _report_text(rows: list[dict], total: float, steps: int) -> str:

    columns = ["task", "cases", "Dice", "HD95 mm", "PSNR", "SSIM", "Qabf", "VIF", "baseline", "NFE",
               "ensemble", "seconds"]
    pictures = "\n\n".join(f"![{r['task']}](panels/{r['picture']})" for r in rows)
    return (f"# medidiff demo report\n\nShipped models on the shipped sample scans (held-out slices or cases), sampler "
            f"dpmpp_2m, {steps} steps, seed 0. Total {total:.0f} s on {platform.machine()} with "
            f"{torch.get_num_threads()} threads, medidiff {medidiff.__version__}, torch {torch.__version__}.\n\n"
            f"{markdown_table(rows, columns)}\n\n{pictures}\n")
