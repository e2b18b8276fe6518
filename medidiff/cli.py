"""The ``medidiff`` command.

``medidiff fit|validate|test|predict --config configs/<task>/<data>.yaml`` is LightningCLI; ``infer``,
``evaluate`` and ``demo`` are medidiff's own file-to-file commands. User errors print one line and exit
with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

from medidiff.errors import MedidiffError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# What DiffusionModule records in its hyperparameters beside its arguments (how to rebuild the network, which
# task and class wrote the checkpoint): read by medidiff.checkpoint, never arguments themselves.
BOOKKEEPING_HPARAMS = ("net_config", "task", "module")


def run_lightning(argv: Sequence[str]) -> None:
    import warnings

    import lightning as L

    from medidiff.data.datamodule import MedicalDataModule

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    _cli_class()(L.LightningModule, MedicalDataModule, subclass_mode_model=True, args=list(argv),
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


def _cli_class():
    """LightningCLI with a safe, medidiff-aware ``--ckpt_path`` (imported lazily: ``infer`` needs no Lightning)."""
    from pathlib import Path

    from lightning.pytorch.cli import LightningCLI

    from medidiff.checkpoint import read_checkpoint

    class MedidiffCLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            """The network's input channels and the classes come from the data card: a value left null is
            filled from it, one that differs is a one-line error naming both."""
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            if config.get("data") and config["data"].get("card"):
                fill_from_card(config)

        def _parse_ckpt_path(self) -> None:
            """Lightning feeds a checkpoint's hyperparameters back as model arguments before resuming. Load the
            file through :func:`read_checkpoint` (weights only; a missing, foreign or code-carrying file is a
            MedidiffError) and leave medidiff's bookkeeping entries out of the arguments."""
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not ckpt_path or ckpt_path in ("best", "last", "hpc", "registry"):  # Lightning's own lookups
                return super()._parse_ckpt_path()
            hparams = dict(read_checkpoint(Path(ckpt_path))["hyper_parameters"])
            for key in ("_instantiator", *BOOKKEEPING_HPARAMS):
                hparams.pop(key, None)
            if not hparams:
                return None
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
            return None

    return MedidiffCLI


def fill_from_card(config) -> None:
    """Check (or fill, where null) ``cond_channels`` / ``in_channels`` of the network and ``num_classes`` of the
    model against the card the data module will load (``config``: the subcommand's jsonargparse namespace)."""
    from medidiff.data.cards import load_card

    data, model = config["data"], config["model"]
    card = load_card(data["card"], check_files=False)
    task = data.get("task") or "segmentation"
    init = model.get("init_args") or {}
    net = (init.get("net") or {}).get("init_args") or {}
    net_class = str((init.get("net") or {}).get("class_path", ""))
    channels = len(card.inputs["image"].use) if task != "fusion" and "image" in card.inputs else None
    names = ", ".join(card.inputs["image"].use) if channels else ""
    field = "cond_channels" if net_class.endswith("ConditionalUNet") else "in_channels"
    if channels is not None and field in net:
        _settle(net, field, channels, f"model.init_args.net.init_args.{field}",
                f"card '{card.name}' gives {channels} image channel(s) ({names}); or choose channels with the "
                "card's inputs.image.use")
    if task == "segmentation" and "num_classes" in init:
        _settle(init, "num_classes", card.num_classes, "model.init_args.num_classes",
                f"card '{card.name}' names {card.num_classes} classes ({', '.join(card.labels)})")


def _settle(namespace, key: str, expected: int, flag: str, why: str) -> None:
    from medidiff.errors import MedidiffError

    if namespace[key] is None:
        namespace[key] = expected
    elif namespace[key] != expected:
        raise MedidiffError(f"{flag} is {namespace[key]} but the {why}; set --{flag} {expected} (or leave it "
                            "null to take it from the card)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            run_lightning(argv)
        else:
            from medidiff.commands import run_command

            run_command(argv)
    except MedidiffError as error:
        if debug:
            raise
        print(f"medidiff: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("medidiff: interrupted; completed outputs are kept, partial ones were not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
