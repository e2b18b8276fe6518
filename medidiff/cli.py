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


def run_lightning(argv: Sequence[str]) -> None:
    import warnings

    from lightning.pytorch.cli import LightningCLI

    import lightning as L

    from medidiff.data.datamodule import MedicalDataModule

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    LightningCLI(L.LightningModule, MedicalDataModule, subclass_mode_model=True, args=list(argv),
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


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
