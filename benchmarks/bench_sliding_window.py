"""Sliding-window diffusion on large 3D volumes: peak memory and time versus volume size, and a seam check.

    python benchmarks/bench_sliding_window.py [--sizes 64,96,128,192] [--roi 64] [--steps 4] [--seed 0]

Model: the shipped 3D super-resolution checkpoint (medidiff/weights/superres_ct_3d.ckpt, trained weights so the
output is an image, not noise), sampling with dpmpp_2m through `SlidingWindowDenoiser` (Gaussian blending,
overlap 0.25, one window per network call: the memory-bounded setting). Input: a smooth synthetic phantom of
size^3 voxels. Each size runs in its own process so that its peak resident memory (ru_maxrss) is its own.

Seams: windows are blended at every step; ideally no window border survives to the final sample. The check
compares the mean absolute difference between neighbouring voxels across the planes where a window starts or
ends with the same quantity across all other planes, in the sample and, as the control, in the input (whose
structure alone makes the ratio differ from 1); a sample ratio no larger than the input's means no stitching.
A second, border-independent statistic is the worst local spike of that per-plane profile. Both are printed
for the default fixed grid and for the opt-in shifted grid (`SlidingWindowDenoiser(shift=True)`).
Targets (issue 7): peak memory at 192^3 <= 1.2x that at 64^3; time linear in voxels (per-voxel time flat once
windows overlap); sample seam ratio <= input ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def phantom(size: int, seed: int) -> torch.Tensor:
    """Smooth blobs in [0, 1], ``(1, 1, size, size, size)``.

    Each isotropic Gaussian blob is the outer product of three 1D profiles, added in place: the phantom costs
    one volume of memory, not the several volume-sized temporaries of a coordinate grid, which would otherwise
    set the process's peak memory before sampling even starts."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.linspace(0, 1, size)
    volume = torch.zeros(size, size, size)
    for _ in range(12):
        centre, width = torch.rand(3, generator=generator), 0.05 + 0.15 * torch.rand(1, generator=generator)
        x, y, z = (torch.exp(-((axis - c) ** 2) / (2 * width**2)) for c in centre)
        volume.add_(x[:, None, None] * (y[:, None] * z)[None])
    return volume.div_(volume.max())[None, None]


def window_borders(size: int, roi: int, overlap: float) -> list[int]:
    """Planes (index i: between voxel i and i+1) where a window starts or ends, as MONAI places windows."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval((size,), (roi,), 1, (overlap,))
    starts = sorted({s[0].start for s in dense_patch_slices((size,), (roi,), interval)})
    planes = {p for s in starts for p in (s - 1, s + roi - 1)}
    return sorted(p for p in planes if 0 <= p < size - 1)


def seam_ratio(volume: torch.Tensor, borders: list[int]) -> float:
    """Mean |neighbour difference| across border planes over that across all other planes, all three axes."""
    across, inside = [], []
    for axis in range(3):
        steps = volume.diff(dim=axis).abs().movedim(axis, 0).flatten(1).mean(1)
        mask = torch.zeros(steps.shape[0], dtype=torch.bool)
        mask[borders] = True
        across.append(steps[mask].mean())
        inside.append(steps[~mask].mean())
    return float(torch.stack(across).mean() / torch.stack(inside).mean())


def spike_ratio(volume: torch.Tensor, margin: int = 4) -> float:
    """Largest local spike of the per-plane mean |neighbour difference| (plane over the median of the planes
    around it), over all axes; seams are such spikes wherever the grid put them. Volume edges are excluded."""
    worst = 0.0
    for axis in range(3):
        profile = volume.diff(dim=axis).abs().movedim(axis, 0).flatten(1).mean(1)
        for i in range(margin, profile.shape[0] - margin):
            local = profile[i - margin:i + margin + 1].median()
            worst = max(worst, float(profile[i] / local))
    return worst


@torch.no_grad()
def windowed_sample(system, cond: torch.Tensor, windows, *, sampler: str, steps: int, seed: int) -> torch.Tensor:
    """``system.sample(cond, sampler=, steps=, seed=, window=...)`` of one member without a hook, denoising through
    ``windows`` instead of the wrapper ``window=`` builds (its defaults: 4 windows per network call, fixed grid): the
    steps of ``DiffusionModule.draw`` and ``sample``, ``(N, B, C, *spatial)`` in the target's space."""
    from medidiff.core import ClassifierFreeGuidance, get_sampler
    from medidiff.core.padding import crop, level_multiple, pad_to_multiple

    padded, pad = pad_to_multiple(cond.float(), level_multiple(system.net))
    sigmas = system.denoiser.get_sigmas(steps, system.hparams.grid)
    generator = torch.Generator(system.device).manual_seed(seed)
    x = torch.randn((cond.shape[0], system.net.in_channels, *padded.shape[2:]), generator=generator,
                    device=system.device).mul_(sigmas[0].to(system.device))
    guidance = system.hparams.guidance_scale
    base = windows if guidance == 1 else ClassifierFreeGuidance(windows, guidance)
    samples = get_sampler(sampler)(functools.partial(base, cond=padded), x, sigmas, generator=generator)
    return system.task.undiffuse(crop(samples, pad)[None], cond)


def worker(size: int, roi: int, steps: int, seed: int, shift: bool) -> dict:
    from medidiff.demo import WEIGHTS
    from medidiff.lit.registry import load_system
    from medidiff.sliding import SlidingWindowDenoiser

    system, _ = load_system(WEIGHTS / "superres_ct_3d.ckpt", task="superres")
    cond = phantom(size, seed) * 2 - 1
    denoiser = SlidingWindowDenoiser(system.denoiser, (roi,) * 3, overlap=0.25, batch_size=1, shift=shift)
    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    sample = windowed_sample(system, cond, denoiser, sampler="dpmpp_2m", steps=steps, seed=seed)[0, 0, 0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    borders = window_borders(size, roi, 0.25)
    # the phantom's own structure sets the ratio an image without seams has at these planes
    return {"size": size, "shift": shift, "seconds": seconds, "peak_mb": peak, "idle_mb": idle,
            "border_ratio": seam_ratio(sample, borders) if borders else None,
            "input_border_ratio": seam_ratio(cond[0, 0], borders) if borders else None,
            "spike": spike_ratio(sample), "input_spike": spike_ratio(cond[0, 0])}


def run_worker(size: int, args: argparse.Namespace, shift: bool) -> dict:
    command = [sys.executable, __file__, "--worker", str(size), "--roi", str(args.roi), "--steps", str(args.steps),
               "--seed", str(args.seed)] + (["--shift"] if shift else [])
    env = dict(os.environ)
    if args.mmap_threshold:
        # glibc serves allocations above this size by mmap and unmaps them on free: freed volume-sized tensors
        # leave no holes in the heap, so peak RSS follows the live tensors instead of the heap's fragmentation
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"size {size} failed:\n{result.stderr[-2000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"size {size}, shift {shift}: {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,96,128,192")
    parser.add_argument("--seam-size", type=int, default=128, help="size at which fixed and shifted grids are compared")
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_ (e.g. 1048576); 0: the default")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shift", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.roi, args.steps, args.seed, args.shift)))
        return
    start = time.perf_counter()
    rows = [run_worker(int(size), args, shift=False) for size in args.sizes.split(",")]
    shifted = run_worker(args.seam_size, args, shift=True)
    first = rows[0]
    print(f"\nSliding-window sampling, roi {args.roi}^3, overlap 0.25, 1 window per call, dpmpp_2m {args.steps} NFE, "
          f"seed {args.seed}, fixed window grid (the default), "
          f"{'MALLOC_MMAP_THRESHOLD_=' + str(args.mmap_threshold) if args.mmap_threshold else 'default glibc malloc'}")
    print(f"{'volume':>8s} {'peak RSS':>9s} {'vs first':>9s} {'above idle':>11s} {'time':>8s} {'us/voxel/NFE':>13s}")
    for r in rows:
        print(f"{r['size']:>6d}^3 {r['peak_mb']:7.0f} MB {r['peak_mb'] / first['peak_mb']:8.2f}x "
              f"{r['peak_mb'] - r['idle_mb']:8.0f} MB {r['seconds']:7.1f}s "
              f"{1e6 * r['seconds'] / r['size'] ** 3 / args.steps:13.2f}")
    fixed = next(r for r in rows if r["size"] == args.seam_size)
    print(f"\nSeams at {args.seam_size}^3 (1 = no plane stands out; the input is the control):")
    print(f"{'window grid':>12s} {'border/other planes':>20s} {'input same planes':>18s} {'worst spike':>12s} "
          f"{'input spike':>12s}")
    for name, r in (("fixed", fixed), ("shifted", shifted)):
        print(f"{name:>12s} {r['border_ratio']:20.3f} {r['input_border_ratio']:18.3f} {r['spike']:12.3f} "
              f"{r['input_spike']:12.3f}")
    print(f"\nwall time {time.perf_counter() - start:.0f} s on {platform.machine()}, "
          f"{torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
