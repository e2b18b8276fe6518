"""Quality versus NFE on a trained model: medidiff's samplers against MONAI's DiffusionInferer with DDPM-1000 and
DDIM-50, on the same network, inputs and noise seed, in one run.

    python benchmarks/bench_quality_nfe.py --ckpt RESTORATION.ckpt --cases DIR [--slices 4] [--seed 0]
    python benchmarks/bench_quality_nfe.py --task segmentation --ckpt DRIVE.ckpt [--slices 3] [--seed 0]

Restoration model: the MNI152 4x k-space restoration diffusion model of tasks/restoration/README.md (sample prediction,
linear schedule, T = 1000). Cases: the first ``--slices`` held-aside slices written by tasks/restoration/results.py
(``DIR/zero_filled`` and ``DIR/reference``). Sampling is *without* data consistency here, because MONAI's
inferer has no per-step hook: the comparison is about samplers, on the same conditional network. PSNR is
computed in the model's [0, 1] intensity space (data range 1), against the reference mapped by the same
intensity window as the input. Target (issue 7): <= 20 NFE within noise of DDPM-1000 (the spread over slices is
printed as the noise), <= 10 NFE within 1 dB.

Segmentation model: a DRIVE checkpoint of tasks/segmentation/README.md; cases: the first ``--slices`` DRIVE test
images, whole (565 x 584), as the data module's test split prepares them; score: vessel Dice inside the field-of-view
mask, the task's own validation metric. Target: <= 10 NFE within 1 Dice point of DDPM-1000.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def load_cases(folder: Path, count: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(case, condition in [0, 1] (the model's input), reference in [0, 1] by the same window)``."""
    from monai.transforms import Compose

    from medidiff.data.cards import InputSpec
    from medidiff.data.transforms import standardise

    spec = InputSpec(("T1",), ("T1",), {"method": "percentile", "lower": 0.5, "upper": 99.5})
    normalise = Compose(standardise({"image": spec}, spatial_dims=3, resample=False, record_bounds=True))
    cases = []
    for path in sorted((folder / "zero_filled").glob("*.nii.gz"))[:count]:
        degraded = torch.from_numpy(nib.load(path).get_fdata(dtype=np.float32))[None]
        reference = torch.from_numpy(nib.load(folder / "reference" / path.name).get_fdata(dtype=np.float32))[None]
        prepared = normalise({"image": degraded})  # the normalisation of training and of `medidiff infer`
        low, high = prepared["image_bounds"][0].tolist()
        condition = torch.as_tensor(prepared["image"]).float()
        cases.append((path.name, condition, ((reference - low) / (high - low)).clamp(0, 1)))
    return cases


def load_drive_cases(count: int) -> list[tuple[str, torch.Tensor, dict]]:
    """``(case, image condition (1, C, H, W), {"label", "fov"} batch)`` for the first DRIVE test images."""
    from medidiff.data.datamodule import MedicalDataModule

    data = MedicalDataModule("drive", "segmentation", spatial_dims=2, cache=False)
    data.setup("test")
    items = [data.datasets["test"][i] for i in range(count)]
    return [(item["id"], item["image"][None].float(), {k: item[k][None] for k in ("label", "fov")}) for item in items]


def psnr(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(-10 * torch.log10(((estimate - reference) ** 2).mean()))


def monai_sample(module, cond: torch.Tensor, scheduler_name: str, steps: int, seed: int) -> torch.Tensor:
    """MONAI's own path: DiffusionInferer.sample with concat conditioning (``cond``: the network's condition, as
    the task makes it from the inputs) on the same network."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    from medidiff.core.padding import level_multiple

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[scheduler_name]
    scheduler = cls(1000, prediction_type="sample", clip_sample=False)
    scheduler.set_timesteps(steps)
    multiple = level_multiple(module.net)
    pad = [(-s) % multiple for s in cond.shape[2:]]
    padded = torch.nn.functional.pad(cond, [0, pad[1], 0, pad[0]], mode="replicate")
    noise = torch.randn((1, 1, *padded.shape[2:]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sample = DiffusionInferer(scheduler).sample(noise, module.net.unet, scheduler, conditioning=padded,
                                                    mode="concat", verbose=False)
    return module.task.decode(sample[..., :cond.shape[2], :cond.shape[3]])


def main() -> None:
    from medidiff.lit.registry import load_system

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--cases", type=Path, default=Path("runs/r5/restoration_results/cases"))
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("restoration", "segmentation"), default="restoration")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="MONAI DDPM steps (fewer only for smoke runs)")
    args = parser.parse_args()
    module, _ = load_system(args.ckpt, task=args.task)
    if args.task == "segmentation":
        cases = [(name, {"image": image}, batch) for name, image, batch in load_drive_cases(args.slices)]

        def sample(inputs: dict, **sampling) -> torch.Tensor:  # probabilities (N, B, C, H, W)
            return module.predict(inputs, seed=args.seed, **sampling)

        def score(prediction: torch.Tensor, batch: dict) -> float:  # prediction (1, C, H, W)
            return module.task.sample_metrics(prediction[None], batch)["dice"]

        metric, unit, what = "Dice", "", "DRIVE test images (inside the field of view)"
    else:
        cases = [(name, {"condition": cond[None]}, ref) for name, cond, ref in load_cases(args.cases, args.slices)]

        def sample(inputs: dict, **sampling) -> torch.Tensor:  # ensemble-mean images (B, C, H, W) in [0, 1]
            # no k-space mask among the inputs: no data consistency (MONAI's inferer has no per-step hook)
            return module.predict(inputs, seed=args.seed, **sampling).mean(0)

        score, metric, unit, what = psnr, "PSNR", " dB", "held-aside MNI152 slices, no data consistency"
    ddpm = f"MONAI DDPMScheduler, {args.ddpm_steps} steps"
    rows = [(f"medidiff dpmpp_2m, {n} steps", n, lambda c, n=n: sample(c, sampler="dpmpp_2m", steps=n)[0])
            for n in (5, 10, 20, 50)]
    rows += [("medidiff ddim, 50 steps", 50, lambda c: sample(c, sampler="ddim", steps=50, grid="trailing")[0]),
             ("MONAI DDIMScheduler, 50 steps", 50,
              lambda c: monai_sample(module, module.task.condition(c), "ddim", 50, args.seed)),
             (ddpm, args.ddpm_steps,
              lambda c: monai_sample(module, module.task.condition(c), "ddpm", args.ddpm_steps, args.seed))]
    start, results = time.perf_counter(), {}
    for name, nfe, run in rows:
        began = time.perf_counter()
        scores = [score(run(inputs), ref) for _, inputs, ref in cases]
        results[name] = (nfe, scores, time.perf_counter() - began)
        print(f"{name:34s} {metric} {statistics.mean(scores):6.3f}{unit}  ({time.perf_counter() - began:.0f} s)",
              flush=True)
    reference = results[ddpm][1]
    spread = statistics.stdev(reference) / len(reference) ** 0.5 if len(reference) > 1 else float("nan")
    print(f"\n{metric} on {len(cases)} {what}, seed {args.seed}")
    print(f"{'sampler':34s} {'NFE':>5s} {metric:>7s} {'vs DDPM':>13s} {'paired SE':>10s} {'time':>7s}")
    for name, (nfe, scores, seconds) in results.items():
        gaps = [a - b for a, b in zip(scores, reference)]
        se = statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
        print(f"{name:34s} {nfe:5d} {statistics.mean(scores):7.3f} {statistics.mean(gaps):+12.3f} {se:10.3f} "
              f"{seconds:6.0f}s")
    print(f"(standard error of the DDPM mean itself: {spread:.3f}{unit})")
    print(f"\nwall time {time.perf_counter() - start:.0f} s on {platform.machine()}, "
          f"{torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
