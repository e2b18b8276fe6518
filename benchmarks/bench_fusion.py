"""Fusion benchmark on the Harvard test pairs: classical baselines and diffusion fusion at a few NFE.

    .venv/bin/python benchmarks/bench_fusion.py --dataset ct_mri            # trains the prior (~5 min CPU)
    .venv/bin/python benchmarks/bench_fusion.py --dataset pet_mri --nfe 5 10 20
    .venv/bin/python benchmarks/bench_fusion.py --dataset ct_mri --ckpt runs/bench_fusion/ct_mri/.../last.ckpt

1. trains the unconditional prior with ``medidiff fit --config configs/fusion/harvard_<dataset>_2d.yaml``
   under a wall-clock budget (skipped with ``--ckpt``);
2. fuses every test pair of the card, file to file, with :func:`medidiff.inference.infer`
   (the code behind ``medidiff infer --task fusion``): average, max-abs, Laplacian pyramid, then diffusion
   fusion (dpmpp_2m, one network call per step) at each NFE;
3. scores each output folder with :func:`medidiff.metrics.evaluate.evaluate_fusion` (``medidiff evaluate``)
   and prints a markdown table (also written to ``benchmarks/results/fusion_<dataset>.{json,md}``), plus
   PNG panels (source A | source B | fused) of two test cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medidiff import io  # noqa: E402
from medidiff.checkpoint import read_checkpoint  # noqa: E402
from medidiff.cli import main as medidiff_main  # noqa: E402
from medidiff.data.cards import load_card  # noqa: E402
from medidiff.inference import SamplingOptions, from_checkpoint, infer  # noqa: E402
from medidiff.inference.model import Model  # noqa: E402
from medidiff.lit.registry import load_system  # noqa: E402
from medidiff.metrics.evaluate import evaluate_fusion  # noqa: E402
from medidiff.tasks import Fusion  # noqa: E402

METRICS = ("en", "sd", "sf", "mi", "ssim", "qabf", "vif")
DDFM = {"en": 4.64, "sd": 63.11, "mi": 1.99, "vif": 0.76, "qabf": 0.60}  # Zhao et al. ICCV 2023, Harvard


def train_prior(dataset: str, minutes: float, root: Path) -> tuple[Path, float]:
    """``medidiff fit`` under a wall-clock budget; returns the last checkpoint and the seconds it took."""
    start = time.perf_counter()
    code = medidiff_main(["fit", "--config", str(REPO / f"configs/fusion/harvard_{dataset}_2d.yaml"),
                          "--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
                          "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"])
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    return sorted(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)[-1], time.perf_counter() - start


def split_folders(dataset: str, split: str, root: Path, limit: int | None) -> tuple[Path, Path]:
    """Symlink the card's pairs of ``split`` into ``root/source_{a,b}`` so folder-level tools see only them."""
    cases = load_card(f"harvard_{dataset}").splits[split].cases[:limit]
    for role in ("source_a", "source_b"):
        folder = root / role
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = folder / Path(case[role]).name
            if not link.exists():
                link.symlink_to(case[role])
    return root / "source_a", root / "source_b"


def run_method(name: str, dirs: tuple[Path, Path], out: Path, model: Model) -> dict:
    """Fuse all pairs with one method, evaluate, and return a table row."""
    shutil.rmtree(out / name, ignore_errors=True)  # infer resumes; a rerun must not reuse old outputs
    start = time.perf_counter()
    infer(model, {"source_a": dirs[0], "source_b": dirs[1]}, out / name, report=lambda message: None)
    seconds = time.perf_counter() - start
    result = evaluate_fusion(out / name, dirs[0], dirs[1], out_json=out / f"{name}.json")
    pairs = len(result["cases"])
    row = {metric: result["summary"][metric]["mean"] for metric in METRICS}
    return {"method": name, **row, "pairs": pairs, "seconds_per_pair": seconds / pairs}


def panels(dirs: tuple[Path, Path], fused: Path, names: list[str], target: Path, prefix: str) -> list[Path]:
    """Side-by-side PNGs ``source A | source B | fused`` (colour kept), 8-bit, at half resolution."""
    written = []
    for name in names:
        images = []
        for path in (dirs[0] / name, dirs[1] / name, fused / name):
            data = np.asarray(io.read(path), dtype=np.float32)
            images.append(np.repeat(data, 3, axis=0) if data.shape[0] == 1 else data)
        row = np.concatenate(images, axis=2)
        height, width = row.shape[1] // 2 * 2, row.shape[2] // 2 * 2  # half size: small PNGs
        row = row[:, :height, :width].reshape(3, height // 2, 2, width // 2, 2).mean((2, 4)).round()
        row = row.astype(np.uint8)
        written.append(io.write_png(row, target / f"{prefix}_{Path(name).stem}.png"))
    return written


def markdown(rows: list[dict], dataset: str, command: str, seed: int) -> str:
    head = "| method | NFE | " + " | ".join(m.upper() if m != "ssim" else "SSIM" for m in METRICS) + \
        " | s / pair | seed | command |"
    lines = [head, "|" + "---|" * (len(METRICS) + 5)]
    for r in rows:
        values = " | ".join("—" if r.get(m) is None else f"{r[m]:.3f}" for m in METRICS)
        seconds = r.get("seconds_per_pair")
        lines.append(f"| {r['method']} | {r.get('nfe', '—')} | {values} | "
                     f"{'—' if seconds is None else f'{seconds:.2f}'} | {r.get('seed', '—')} | "
                     f"`{r.get('command', command)}` |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("ct_mri", "pet_mri"), required=True)
    parser.add_argument("--ckpt", type=Path, help="a trained fusion prior (skips training)")
    parser.add_argument("--train-minutes", type=float, default=5.0)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: choose likelihood options on validation pairs (own output files, no panels)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many pairs")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="override likelihood options of the checkpoint, e.g. prior_weight=0.1")
    parser.add_argument("--own-sampler", action="store_true",
                        help="sample with the checkpoint's own sampler and grid (a distilled student's) instead of "
                             "dpmpp_2m on the exponential grid")
    parser.add_argument("--name", default=None,
                        help="results under benchmarks/results/<name>.{md,json}, no panels (default: the dataset's "
                             "published table and panels)")
    parser.add_argument("--out", type=Path, default=REPO / "runs/bench_fusion")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 avoids OpenMP oversubscription on a shared CPU")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    root = args.out / args.dataset / ("" if args.split == "test" else args.split)
    command = "python benchmarks/bench_fusion.py " + " ".join(sys.argv[1:])
    if args.ckpt:
        checkpoint, train_seconds = args.ckpt, 0.0
    else:
        checkpoint, train_seconds = train_prior(args.dataset, args.train_minutes, root / "train")
    system, _ = load_system(checkpoint, task="fusion")
    likelihood = dict(system.task.config)  # the prior's likelihood settings (Fusion's arguments)
    for option in args.set:
        name, _, value = option.partition("=")
        if name not in likelihood:
            raise SystemExit(f"--set {option}: not a likelihood option ({', '.join(likelihood)})")
        likelihood[name] = type(likelihood[name])(value)
    system.task = Fusion(**likelihood)
    dirs = split_folders(args.dataset, args.split, root, args.limit)
    results = root / "results"
    rows = [run_method(name, dirs, results, from_checkpoint("fusion", None, method=name))
            for name in ("average", "max_abs", "laplacian")]
    for nfe in args.nfe:
        sampler, grid = ((system.hparams.sampler, system.hparams.grid) if args.own_sampler
                         else ("dpmpp_2m", "exponential"))
        options = SamplingOptions(sampler=sampler, steps=nfe, grid=grid, seed=args.seed)
        task_options = {"contract": system.contract, "method": "diffusion"}
        system.task.prepare(system, system.contract, task_options, checkpoint)
        model = Model(system, system.task, system.contract, options, task_options, str(checkpoint))
        row = run_method(f"diffusion_nfe{nfe}", dirs, results, model)
        rows.append({**row, "nfe": nfe, "seed": args.seed})
    rows.append({"method": "DDFM (published, Harvard)", **{m: DDFM.get(m) for m in METRICS},
                 "command": "published by Zhao et al., ICCV 2023"})
    table = markdown(rows, args.dataset, command, args.seed)
    machine = (f"{os.cpu_count()}-core {platform.machine()} CPU ({args.threads} torch thread), "
               f"torch {torch.__version__}")
    steps = read_checkpoint(checkpoint).get("global_step")
    trained = f"trained {train_seconds / 60:.1f} min here" if not args.ckpt else "trained separately"
    footer = (f"\n\n{len(list(dirs[0].iterdir()))} {args.split} pairs of harvard_{args.dataset}; prior {trained}, "
              f"{steps} steps ({checkpoint}); machine: {machine}")
    print(table + footer)
    out = REPO / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"fusion_{args.dataset}" + ("" if args.split == "test" else f"_{args.split}")
    (out / f"{stem}.md").write_text(table + footer + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"rows": rows, "train_seconds": train_seconds, "checkpoint": str(checkpoint), "command": command,
         "machine": machine}, indent=1))
    if args.split != "test" or args.name:
        return
    best = max(args.nfe) if 10 not in args.nfe else 10
    names = sorted(p.name for p in dirs[0].iterdir())
    picks = [names[len(names) // 3], names[2 * len(names) // 3]]
    for path in panels(dirs, results / f"diffusion_nfe{best}", picks, REPO / "tasks/fusion", args.dataset):
        print(f"panel: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
