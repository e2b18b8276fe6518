"""The ``medidiff`` command.

``medidiff fit|validate --config configs/<task>/<data>.yaml`` is LightningCLI (:mod:`medidiff.lightning_cli`);
``infer``, ``evaluate``, ``export``, ``models`` and ``demo`` are medidiff's own commands. User errors print one line
and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Sequence

from medidiff.errors import MedidiffError

LIGHTNING_COMMANDS = ("fit", "validate")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from medidiff.lightning_cli import run_lightning  # Lightning only for the commands that train

            run_lightning(argv)
        else:
            from medidiff.commands import run_command

            run_command(argv)
    except MedidiffError as error:
        if debug:
            raise
        print(f"medidiff: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as interrupt:
        print(getattr(interrupt, "message", "medidiff: interrupted; completed outputs are kept, partial ones were "
                      "not written"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
