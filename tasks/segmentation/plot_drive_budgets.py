"""Vessel Dice against NFE for the DRIVE diffusion runs of the README, UNets of equal steps as lines.

    python tasks/segmentation/plot_drive_budgets.py   # reads drive_rows_*.json beside this file
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RUNS = [("drive_rows_900_no_recycling.json", "900 steps, no recycling", "tab:gray"),
        ("drive_rows_900.json", "900 steps, recycling 0.5", "tab:blue"),
        ("drive_rows_3600.json", "3600 steps, recycling 0.5", "tab:green")]


def main() -> None:
    import json

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, label, colour in RUNS:
        rows = json.loads((HERE / name).read_text())["rows"]
        points = sorted((int(r["args"].split()[-1]), r["dice"]) for r in rows
                        if r["row"].startswith("dpmpp_2m_nfe") and r["n"] == 20)
        ax.plot(*zip(*points), "o-", color=colour, label=f"diffusion, {label}")
        unet = next(r["dice"] for r in rows if r["row"] == "unet")
        ax.axhline(unet, color=colour, linestyle="--", linewidth=1)
    ax.plot([], [], "k--", linewidth=1, label="UNet of the same steps (colour)")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations), dpmpp_2m")
    ax.set_ylabel("vessel Dice, DRIVE test (20)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(HERE / "drive_dice_vs_nfe.png", dpi=100)


if __name__ == "__main__":
    main()
