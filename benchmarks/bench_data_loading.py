"""Is data loading the bottleneck? Time spent fetching a batch versus one training step, with a shipped config.

    python benchmarks/bench_data_loading.py [--config configs/segmentation/drive_2d.yaml] [--batches 20]

Builds the config's data module and model exactly as `medidiff fit` would (LightningCLI parser), warms the cache
with one pass, then measures over `--batches` batches: the wall time of `next(loader)` and of a full optimisation
step (forward, backward, AdamW) under the config's precision. Prints the fraction of a step spent waiting for data
(target < 10 %).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import yaml


def build(config_path: str):
    from medidiff.data.datamodule import MedicalDataModule
    from medidiff.lit import DistillationModule
    from medidiff.lit.registry import SYSTEMS
    from medidiff.nets import ConditionalUNet, PlainUNet
    from medidiff.tasks import task_named

    config = yaml.safe_load(open(config_path))
    model_cfg = config["model"]["init_args"]
    net_cfg, task_cfg = model_cfg.pop("net"), model_cfg.pop("task")
    net_cls = {"medidiff.nets.ConditionalUNet": ConditionalUNet, "medidiff.nets.PlainUNet": PlainUNet}[
        net_cfg["class_path"]]
    task = task_named(task_cfg["class_path"])(**(task_cfg.get("init_args") or {}))
    systems = {**SYSTEMS, "DistillationModule": DistillationModule}
    module = systems[config["model"]["class_path"].rsplit(".", 1)[1]](net=net_cls(**net_cfg["init_args"]), task=task,
                                                                      **model_cfg)
    data = MedicalDataModule(**config["data"])
    return module, data, config["trainer"].get("precision", "32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/segmentation/drive_2d.yaml")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    module, data, precision = build(args.config)
    loader = data.train_dataloader()
    for _ in loader:  # fill the cache: the first epoch is not what training waits on
        pass
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    fetch = step = 0.0
    done = 0
    while done < args.batches:
        iterator = iter(loader)
        while done < args.batches:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            fetch += time.perf_counter() - start
            start = time.perf_counter()
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
                loss = module.training_step(module.on_after_batch_transfer(batch, 0), done)
            loss.backward()
            optimizer.step()
            step += time.perf_counter() - start
            done += 1
    print(f"{args.config}: {done} batches, data {fetch / done * 1e3:.0f} ms/batch, "
          f"step {step / done * 1e3:.0f} ms/batch,"
          f" waiting for data {100 * fetch / (fetch + step):.1f} % of the time")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
