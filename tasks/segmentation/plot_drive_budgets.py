"""Vessel Dice against NFE for the DRIVE diffusion runs of the README, UNets of equal steps as lines.

    python tasks/segmentation/plot_drive_budgets.py   # reads drive_rows_*.json beside this file
"""

import json
from pathlib import Path

from drive_results import plot_dice_vs_nfe

HERE = Path(__file__).parent
RUNS = [("drive_rows_900_no_recycling.json", "900 steps, no recycling", "tab:gray"),
        ("drive_rows_900.json", "900 steps, recycling 0.5", "tab:blue"),
        ("drive_rows_3600.json", "3600 steps, recycling 0.5", "tab:green")]


def main() -> None:
    runs = [(json.loads((HERE / name).read_text())["rows"], label, colour) for name, label, colour in RUNS]
    plot_dice_vs_nfe(runs, HERE / "drive_dice_vs_nfe.png")


if __name__ == "__main__":
    main()
