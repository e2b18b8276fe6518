"""``medidiff fit`` and ``medidiff validate``: LightningCLI with medidiff's checks before anything is built (a
configuration against its data card, precision against the hardware, the run folder), safe checkpoint loading and
atomic writes, a step progress bar, quiet Lightning notices and one line for every user error.

Imported only by those commands: ``infer`` and ``evaluate`` need no Lightning.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.states import TrainerStatus

from medidiff.arguments import parameters
from medidiff.callbacks import StepProgressBar
from medidiff.checkpoint import SafeCheckpointIO, read_training_checkpoint
from medidiff.data.cards import load_card
from medidiff.data.datamodule import MedicalDataModule
from medidiff.errors import MedidiffError
from medidiff.lit.diffusion import DiffusionSettings
from medidiff.lit.registry import system_named
from medidiff.tasks import REGISTRY, task_named


def run_lightning(argv: Sequence[str]) -> None:
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    quiet_lightning()
    try:
        MedidiffCLI(L.LightningModule, MedicalDataModule, subclass_mode_model=True, args=list(argv),
                    save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                    parser_kwargs={"exit_on_error": False})
    except ArgumentError as err:
        raise MedidiffError(config_error(str(err))) from None


class MedidiffCLI(LightningCLI):
    """LightningCLI with a safe, medidiff-aware ``--ckpt_path``, checks before anything is built, medidiff's
    progress bar and a clean Ctrl-C."""

    def before_instantiate_classes(self) -> None:
        """The network's input channels and the classes come from the data card: a value left null is
        filled from it, one that differs is a one-line error naming both. Checkpoints are never loaded with
        pickled code, and the run folder must be writable before anything starts."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("weights_only") is False:
            raise MedidiffError("--weights_only false is refused: medidiff loads checkpoints as weights only, "
                                "so that a checkpoint cannot run code")
        if config.get("data") and config["data"].get("card"):
            fill_from_card(config)
        if config.get("trainer"):
            cpu_precision(config["trainer"])
        writable_root(config.get("trainer", {}).get("default_root_dir"))

    def instantiate_classes(self) -> None:
        """A MedidiffError raised while the model or data module is built (a predictor checkpoint that is
        missing or foreign, say) reaches the user as itself, not wrapped in jsonargparse's type errors."""
        try:
            super().instantiate_classes()
        except MedidiffError:
            raise
        except Exception as error:  # noqa: BLE001 - only to look for ours inside the chain
            cause = error
            while cause is not None and not isinstance(cause, MedidiffError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def instantiate_trainer(self, **kwargs):
        """Every checkpoint Lightning loads (``--ckpt_path`` of a file, ``last``, ``best``, ``hpc``) goes
        through :func:`medidiff.checkpoint.read_checkpoint`: weights only, clear errors."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        return super().instantiate_trainer(**kwargs, plugins=[*plugins, SafeCheckpointIO()])

    def _instantiate_trainer(self, config, callbacks):
        """medidiff's progress bar (steps, not "Epoch 293/-2") unless the configuration brings its own."""
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning answers Ctrl-C by saving nothing more and calling ``sys.exit(1)``: give the user the
        interrupt's exit status (130) and one line instead."""
        try:
            super()._run_subcommand(subcommand)
        except SystemExit as stop:
            if stop.code == 1 and self.trainer.state.status == TrainerStatus.INTERRUPTED:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left Ctrl-C ignored
                raise TrainingInterrupted from None
            raise

    def _parse_ckpt_path(self) -> None:
        """Lightning feeds a checkpoint's hyperparameters back as model arguments before resuming, and
        jsonargparse imports any ``class_path`` among them. The configuration alone says what to build:
        resuming reads weights and optimizer state only. A given file is checked now (readable, intact, no
        pickled code), so that a bad one is one line before anything is built."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("best", "last", "hpc", "registry"):  # Lightning's own lookups
            read_training_checkpoint(Path(ckpt_path))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: the checkpoints written so far stay, the run resumes with ``--ckpt_path last``."""

    message = "medidiff: interrupted; the checkpoints written so far are kept (resume with --ckpt_path last)"


# Lightning's notices that say nothing to a medidiff user (hardware it does not use, a cloud logger to install,
# implementation notes on hooks medidiff overrides on purpose, logging intervals longer than an epoch of a sample)
_NOISE = ("GPU available:", "TPU available:", "💡 Tip:", "`tensorboardX` has been removed",
          "isinstance(treespec, LeafSpec)", "is smaller than the logging interval", "You have overridden "
          "`on_after_batch_transfer`", "does not have many workers", "Checkpoint directory",
          "The dirpath has changed")


def quiet_lightning() -> None:
    for text in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")

    class Quiet(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(text in record.getMessage() for text in _NOISE)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, Quiet) for f in logger.filters):
            logger.addFilter(Quiet())


def config_error(message: str) -> str:
    """A LightningCLI parser error in one line: the key it refused and the accepted key nearest to it."""
    text = " ".join(message.split())
    found = (re.search(r"Option '([\w.]+)' is not accepted", text) or re.search(r"accept option '([\w.]+)'", text)
             or re.search(r"unrecognized arguments: --([\w.]+)", text))
    if not found:
        return invalid_value(message) or f"the configuration is not valid: {text[:400]}"
    key = found.group(1)
    classes = re.findall(r"class_path '([\w.]+)'", text)
    owner = classes[-1] if classes else {"data": "medidiff.data.datamodule.MedicalDataModule",
                                         "trainer": "lightning.pytorch.Trainer"}.get(key.split(".")[0], "")
    hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], _parameters(owner), n=1) or \
        _nested_home(key if "." in key or not owner.startswith("medidiff.lit") else f"model.init_args.{key}")
    where = f" of {owner}" if owner else ""
    return (f"unknown configuration key '{key}'{where}" + (f"; did you mean '{hint[0]}'?" if hint else "")
            + " (medidiff fit --help lists them)")


def _nested_home(key: str) -> list[str]:
    """A model setting given where it does not live: task settings are under ``model.init_args.task.init_args``,
    the denoiser's under ``model.init_args.diffusion``."""

    prefix, _, name = key.rpartition(".")
    if not prefix.endswith("model.init_args"):
        return []
    if name in {field.name for field in dataclasses.fields(DiffusionSettings)}:
        return [f"{prefix}.diffusion.{name}"]
    if any(name in parameters(cls) for cls in REGISTRY.values()):
        return [f"{prefix}.task.init_args.{name}"]
    return []


def invalid_value(message: str) -> str | None:
    """jsonargparse's nested "does not validate" report as one line: the full key, what it takes, what it got."""
    keys = re.findall(r'Parser key "([\w.]+)"', message)
    expected = re.findall(r"Expected a <class '(\w+)'>", message)
    given = re.findall(r"Given value: (.*)", message)
    kinds = re.findall(r"Given value type: <class '([\w.]+)'>", message)
    if not keys or not expected or not given:
        return None
    key = ".".join(k if i == 0 else f"init_args.{k}" for i, k in enumerate(keys))
    value, kind = given[0].strip(), kinds[0] if kinds else "?"
    line = (f"configuration key '{key}' takes {' or '.join(dict.fromkeys(expected))}, not {value!r} ({kind})")
    if value == "None" and kind == "str":
        # jsonargparse reads `null` given on the command line for a nested class argument as the text "None"
        line += "; a null cannot be given on the command line here: write it in the configuration file"
    return line


def _parameters(class_path: str) -> list[str]:
    """The keyword arguments ``class_path`` accepts, its base classes' included (they take ``**kwargs``)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names = []
    for klass in getattr(cls, "__mro__", [cls]):
        if "__init__" in vars(klass):
            names += [p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs")]
    return names


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN emulates it."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: True)() for probe in probes)


def runs_on_cpu(accelerator) -> bool:
    if accelerator in (None, "auto"):
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return accelerator == "cpu"


def cpu_precision(trainer) -> None:
    """bf16 autocast on a CPU without bf16 hardware is emulated: a training step of the restoration network took
    9.2 s against 0.7 s in float32 on an AVX2-only CPU. There the configs' ``bf16-mixed`` becomes ``32-true``,
    said on stderr; a CPU with AVX512-BF16 or AMX (1.6x faster in bf16) and every GPU keep it."""
    precision = str(trainer.get("precision") or "")
    if not precision.startswith("bf16") or not runs_on_cpu(trainer.get("accelerator")) or cpu_has_bf16():
        return
    trainer["precision"] = "32-true"
    print(f"medidiff: precision {precision} needs a CPU with AVX512-BF16 or AMX, which this one lacks (emulated bf16 "
          "is about 13x slower here); training in 32-true", file=sys.stderr)


def writable_root(root) -> None:
    """Create the run folder now, so that an unwritable place is one line, not a traceback mid-training."""
    if not root:
        return
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedidiffError(f"cannot create the run folder ({err.strerror})", root) from None
    if not os.access(root, os.W_OK):
        raise MedidiffError("the run folder is not writable", root)


def fill_from_card(config) -> None:
    """Check (or fill, where null) the task's card-given settings (``num_classes``) and the network's condition
    channels (``cond_channels`` of a diffusion network, ``in_channels`` of a supervised one) against the card the
    data module will load (``config``: the subcommand's jsonargparse namespace)."""
    data, model = config["data"], config["model"]
    card = load_card(data["card"], check_files=False)
    init = model.get("init_args") or {}
    spec = init.get("task") or {}
    task = task_named(str(spec.get("class_path", "")))
    if task is None:
        return  # not a medidiff task: its own checks apply
    if data.get("task") != task.name:
        raise MedidiffError(f"the model's task is {task.name} but data.task is {data.get('task')!r}; set --data.task "
                            f"{task.name}")
    settings = spec.get("init_args") or {}
    for key, value in task.card_settings(card).items():
        if key in settings:
            _settle(settings, key, value, f"model.init_args.task.init_args.{key}",
                    f"card '{card.name}' names {value} classes ({', '.join(card.labels)})")
    _settle_condition(init, card, task, dict(settings), str(model.get("class_path", "")))


def _settle_condition(init, card, task, settings: dict, system_path: str) -> None:
    net = (init.get("net") or {}).get("init_args") or {}
    field = "cond_channels" if str((init.get("net") or {}).get("class_path", "")).endswith("ConditionalUNet") \
        else "in_channels"
    diffused, condition = task.channels(card, settings)
    system = system_named(system_path)
    expected = system.condition_channels(condition, diffused) if system is not None else condition
    if field in net and condition:
        names = ", ".join(card.inputs["image"].use) if "image" in card.inputs else ""
        plus = f" plus {expected - condition} of the predictor's estimate" if expected != condition else ""
        _settle(net, field, expected, f"model.init_args.net.init_args.{field}",
                f"card '{card.name}' gives {condition} image channel(s) ({names}){plus}; or choose channels with "
                "the card's inputs.image.use")


def _settle(namespace, key: str, expected: int, flag: str, why: str) -> None:
    if namespace[key] is None:
        namespace[key] = expected
    elif namespace[key] != expected:
        raise MedidiffError(f"{flag} is {namespace[key]} but the {why}; set --{flag} {expected} (or write "
                            "null for it in the configuration file to take it from the card)")
