"""Sampler quality versus NFE on a Gaussian mixture with an exact denoiser, and sampler overhead versus a
MONAI DiffusionModelUNet forward on the same input. Everything is measured in one run, side by side.

    python benchmarks/bench_samplers.py [--seed 0] [--out benchmarks/results/samplers.json]

Quality: for every sampler and NFE budget (5, 10, 20, 50), the 1-Wasserstein distance between the
samples and the true mixture (all samplers), and the RMS error against a 2000-step reference solution of
the probability-flow ODE from the same starting noise (deterministic samplers).
Overhead: wall time per step of each sampler's own arithmetic (a denoiser that costs nothing) divided by
one forward of a 1.1 M-parameter 2D DiffusionModelUNet (channels 32-64-64), batch 8, 64x64.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from medidiff.core.analytic import GaussianMixture
from medidiff.core.samplers import SAMPLERS, nfe_of, steps_for_nfe
from medidiff.core.schedules import (
    alphas_cumprod,
    beta_schedule,
    exponential_sigmas,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
)

NFES = (5, 10, 20, 50)
DETERMINISTIC = ("euler", "ddim", "heun", "dpmpp_2m", "unipc")
# the noise range of a DDPM trained with MONAI's default linear schedule (T = 1000, beta 1e-4 .. 2e-2)
_TRAINED = sigmas_from_alphas_cumprod(alphas_cumprod(beta_schedule("linear", 1000)))
SIGMA_MIN, SIGMA_MAX = float(_TRAINED[0]), float(_TRAINED[-1])
GRIDS = {
    "karras": lambda n: karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, rho=7.0),
    "exponential": lambda n: exponential_sigmas(n, SIGMA_MIN, SIGMA_MAX),
}


def quality_table(seed: int) -> list[dict]:
    mixture = GaussianMixture()
    shape = (8, 1, 64, 64)
    x_start = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * SIGMA_MAX
    reference = SAMPLERS["heun"](mixture.denoiser, x_start, karras_sigmas(2000, SIGMA_MIN, SIGMA_MAX))
    # the reference ends at sigma = 0 like every grid, so ODE RMSE compares like with like
    floor = mixture.wasserstein1(mixture.sample(shape, torch.Generator().manual_seed(seed + 1)))
    rows = []
    for grid_name, grid in GRIDS.items():
        for name in SAMPLERS:
            for nfe in NFES:
                steps = steps_for_nfe(name, nfe)
                out = SAMPLERS[name](mixture.denoiser, x_start, grid(steps),
                                     generator=torch.Generator().manual_seed(seed))
                row = {"sampler": name, "grid": grid_name, "nfe": nfe_of(name, steps), "steps": steps,
                       "w1": mixture.wasserstein1(out), "w1_floor": floor}
                if name in DETERMINISTIC:
                    row["ode_rmse"] = float((out - reference).pow(2).mean().sqrt())
                rows.append(row)
    return rows


def overhead_table(repeats: int = 20) -> tuple[float, list[dict]]:
    from monai.networks.nets import DiffusionModelUNet

    net = DiffusionModelUNet(2, 1, 1, num_res_blocks=1, channels=(32, 64, 64),
                             attention_levels=(False, False, False), norm_num_groups=16).eval()
    x = torch.randn(8, 1, 64, 64)
    t = torch.full((8,), 500.0)
    with torch.no_grad():
        net(x, t)
        start = time.perf_counter()
        for _ in range(5):
            net(x, t)
    forward = (time.perf_counter() - start) / 5
    free_denoiser = lambda x, sigma: x * 0.5  # noqa: E731 - costs one multiply, like any denoiser's output
    rows = []
    for name, sampler in SAMPLERS.items():
        sigmas = karras_sigmas(repeats, SIGMA_MIN, SIGMA_MAX)
        start = time.perf_counter()
        sampler(free_denoiser, x * SIGMA_MAX, sigmas, generator=torch.Generator().manual_seed(0))
        per_step = (time.perf_counter() - start) / nfe_of(name, repeats)
        rows.append({"sampler": name, "seconds_per_nfe": per_step, "fraction_of_forward": per_step / forward})
    return forward, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = quality_table(args.seed)
    print(f"Gaussian mixture, 32768 samples, sigma {SIGMA_MIN:.4f}..{SIGMA_MAX:.1f} (linear DDPM, T=1000), "
          f"seed {args.seed}")
    print(f"W1 floor (fresh exact samples of the same size): {rows[0]['w1_floor']:.2e}")
    print(f"{'sampler':14s}{'grid':13s}{'NFE':>5s}{'W1':>11s}{'ODE RMSE':>11s}")
    for row in rows:
        ode = f"{row['ode_rmse']:.2e}" if "ode_rmse" in row else "-"
        print(f"{row['sampler']:14s}{row['grid']:13s}{row['nfe']:5d}{row['w1']:11.2e}{ode:>11s}")
    print("\nBest sampler vs DDIM at equal NFE, each on its better grid (W1; ratio = DDIM / best):")
    for nfe in NFES:
        at = [r for r in rows if r["nfe"] in (nfe, nfe - 1) and r["sampler"] != "ddim"]
        ddim = min((r for r in rows if r["sampler"] == "ddim" and r["nfe"] == nfe), key=lambda r: r["w1"])
        best = min(at, key=lambda r: r["w1"])
        print(f"  NFE {nfe:3d}: best {best['sampler']}/{best['grid']:12s} W1 {best['w1']:.2e}   "
              f"DDIM/{ddim['grid']:12s} W1 {ddim['w1']:.2e}   ratio {ddim['w1'] / best['w1']:.1f}x")
    forward, overhead = overhead_table()
    print(f"\nOverhead: MONAI DiffusionModelUNet forward (1.1 M params, 8x1x64x64) = {forward * 1e3:.1f} ms")
    for row in overhead:
        print(f"  {row['sampler']:14s}{row['seconds_per_nfe'] * 1e3:8.3f} ms per NFE = "
              f"{100 * row['fraction_of_forward']:.2f} % of a forward")
    total = time.perf_counter() - started
    print(f"\nwall time {total:.1f} s on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"quality": rows, "forward_seconds": forward, "overhead": overhead,
                                        "seed": args.seed, "wall_seconds": total}, indent=1))


if __name__ == "__main__":
    main()
