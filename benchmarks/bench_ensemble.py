"""Ensembles as one batch versus one draw at a time, and medidiff's sampler versus MONAI's DiffusionInferer,
on the same network and input, measured side by side in one run.

    python benchmarks/bench_ensemble.py [--size 288] [--members 5] [--steps 10] [--seed 0]

Network: the DRIVE segmentation net of configs/segmentation/drive_2d.yaml (MONAI DiffusionModelUNet 8-16-32-64,
random weights: cost does not depend on them). Rows:
- medidiff, N members in one batch (`DiffusionModule.sample(ensemble=N)`);
- medidiff, N single draws one after another;
- MONAI `DiffusionInferer.sample` with `DDIMScheduler`, N single draws (how MedSegDiff-style code ensembles).
Target (issue 7): one batch of 5 costs < 0.6 x five single draws.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    from medidiff.lit import DiffusionModule
    from medidiff.nets import ConditionalUNet
    from medidiff.tasks import Segmentation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=288)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    net = ConditionalUNet(2, 1, 1, channels=(8, 16, 32, 64), norm_num_groups=4).eval()
    module = DiffusionModule(net=net, task=Segmentation(num_classes=2), diffusion={"prediction_type": "sample"},
                             sampler="ddim", grid="trailing")
    cond = torch.rand(1, 1, args.size, args.size)
    n, steps = args.members, args.steps

    module.sample(cond, steps=2)  # warm-up
    batch = timed(lambda: module.sample(cond, steps=steps, ensemble=n))
    single = timed(lambda: [module.sample(cond, steps=steps, ensemble=1, seed=s) for s in range(n)])

    scheduler = DDIMScheduler(1000, clip_sample=False, prediction_type="sample")
    scheduler.set_timesteps(steps)
    inferer = DiffusionInferer(scheduler)

    def monai_draws():
        with torch.no_grad():
            for s in range(n):
                noise = torch.randn((1, 1, args.size, args.size), generator=torch.Generator().manual_seed(s))
                inferer.sample(noise, net.unet, scheduler, conditioning=cond, mode="concat", verbose=False)

    monai = timed(monai_draws)
    print(f"{n} members, {steps} NFE each, {args.size}x{args.size}, seed {args.seed}")
    print(f"medidiff, one batch of {n}:        {batch:7.2f} s")
    print(f"medidiff, {n} single draws:        {single:7.2f} s   batch / single = {batch / single:.2f}")
    print(f"MONAI DiffusionInferer, {n} draws: {monai:7.2f} s   medidiff single / MONAI = {single / monai:.2f}")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
