"""Training throughput: medidiff's LightningModule against a bare MONAI training loop, and the opt-in speed
switches (bf16 autocast, channels-last, torch.compile), measured side by side in one run.

    python benchmarks/bench_training.py [--steps 30] [--repeats 3] [--seed 0] [--no-compile]

Same network (a 1.1 M-parameter conditional 2D DiffusionModelUNet, channels 32-64-64, the condition
concatenated), same in-memory data (64 smooth random image/condition pairs, 64x64, batch 8, shuffled by the
same seed), same optimiser (AdamW, lr 1e-4). The bare loop is the MONAI tutorial loop: DDPMScheduler.add_noise,
MSE on the noise, backward, step. medidiff runs `DiffusionModule` with the `Restoration` task (epsilon
prediction) under a Lightning Trainer with logging, checkpointing and the progress bar off. Throughput is images/s
over the steps after a warm-up; the variants are interleaved and each is repeated, the median reported, so machine
noise hits all alike. Targets (issue 7): medidiff >= 0.95x the bare loop; each switch's gain, with an
output-equality check.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

WARMUP = 4  # steps excluded from timing (allocator warm-up; compilation for torch.compile)
BATCH, SIZE, ITEMS = 8, 64, 64


def make_net(seed: int, **kwargs):
    from medidiff.nets import ConditionalUNet

    torch.manual_seed(seed)
    return ConditionalUNet(2, 1, 1, channels=(32, 64, 64), num_res_blocks=1, norm_num_groups=16, **kwargs)


def make_data(seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(ITEMS, 2, SIZE, SIZE, generator=generator)
    smooth = F.avg_pool2d(noise, 5, 1, 2)
    return [{"image": s[:1], "condition": s[1:]} for s in smooth]


def loader(data, seed: int):
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True,
                                       generator=torch.Generator().manual_seed(seed))


def bare_monai(data, steps: int, seed: int) -> float:
    """Images/s of the MONAI tutorial loop on the same network."""
    from monai.networks.schedulers import DDPMScheduler

    net = make_net(seed).unet
    scheduler = DDPMScheduler(1000)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    times, step = [], 0
    while step < steps:
        for batch in loader(data, seed):
            x0, cond = batch["image"] * 2 - 1, batch["condition"] * 2 - 1
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, 1000, (x0.shape[0],), generator=generator)
            prediction = net(torch.cat([scheduler.add_noise(x0, noise, t), cond], 1), t)
            loss = F.mse_loss(prediction.float(), noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter())
            step += 1
            if step == steps:
                break
    return (len(times) - WARMUP) * BATCH / (times[-1] - times[WARMUP - 1])


def medidiff_fit(data, steps: int, seed: int, precision: str = "32-true", **switches) -> float:
    """Images/s of `medidiff fit`'s path: DiffusionModule (Restoration task) under a Lightning Trainer."""
    import lightning as L

    from medidiff.lit import DiffusionModule
    from medidiff.tasks import Restoration

    class StepTimes(L.Callback):
        times: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            self.times.append(time.perf_counter())

    timer = StepTimes()
    timer.times = []
    module = DiffusionModule(net=make_net(seed), task=Restoration(), diffusion={"prediction_type": "epsilon"}, lr=1e-4,
                             warmup_steps=0, **switches)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader(data, seed))
    return (len(timer.times) - WARMUP) * BATCH / (timer.times[-1] - timer.times[WARMUP - 1])


def output_differences(seed: int, compile_too: bool) -> dict[str, float]:
    """Relative L2 difference of one forward pass under each switch against float32, channels-first, eager."""
    net = make_net(seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # MONAI zero-initialises the output convolution; a zero output compares nothing
        for parameter in net.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05, generator=generator)
    x, cond = torch.randn(BATCH, 1, SIZE, SIZE, generator=generator), torch.rand(BATCH, 1, SIZE, SIZE)
    t = torch.full((BATCH,), 500)

    def relative(other: torch.Tensor) -> float:
        return float((other.float() - reference).norm() / reference.norm())

    with torch.no_grad():
        reference = net(x, t, cond=cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = {"bf16-mixed": relative(net(x, t, cond=cond))}
        last = net.to(memory_format=torch.channels_last)
        result["channels_last"] = relative(last(x.contiguous(memory_format=torch.channels_last), t,
                                                cond=cond.contiguous(memory_format=torch.channels_last)))
        if compile_too:
            result["compile"] = relative(torch.compile(net.to(memory_format=torch.contiguous_format))(x, t, cond=cond))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start = time.perf_counter()
    data = make_data(args.seed)
    variants = {
        "bare MONAI loop (fp32)": lambda: bare_monai(data, args.steps, args.seed),
        "medidiff fit (fp32)": lambda: medidiff_fit(data, args.steps, args.seed),
        "medidiff fit, bf16-mixed": lambda: medidiff_fit(data, args.steps, args.seed, precision="bf16-mixed"),
        "medidiff fit, channels_last": lambda: medidiff_fit(data, args.steps, args.seed, channels_last=True),
        "medidiff fit, bf16-mixed + channels_last": lambda: medidiff_fit(data, args.steps, args.seed,
                                                                         precision="bf16-mixed", channels_last=True),
    }
    if not args.no_compile:
        variants["medidiff fit, compile"] = lambda: medidiff_fit(data, args.steps, args.seed, compile=True)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, run in variants.items():
            rates[name].append(run())
            print(f"repeat {repeat + 1}: {name:42s} {rates[name][-1]:6.1f} images/s", flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    bare, fp32 = median["bare MONAI loop (fp32)"], median["medidiff fit (fp32)"]
    differences = output_differences(args.seed, not args.no_compile)
    print(f"\nTraining throughput, batch {BATCH} x {SIZE}x{SIZE}, {args.steps} steps ({WARMUP} warm-up), "
          f"median of {args.repeats}, seed {args.seed}")
    print(f"{'variant':44s} {'images/s':>9s} {'vs bare':>8s} {'vs fp32':>8s}  output rel. diff")
    for name, value in median.items():
        key = next((k for k in differences if k in name and "+" not in name), None)
        diff = f"{differences[key]:.1e}" if key else "-"
        print(f"{name:44s} {value:9.1f} {value / bare:7.2f}x {value / fp32:7.2f}x  {diff}")
    print(f"\nwall time {time.perf_counter() - start:.0f} s on {platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
