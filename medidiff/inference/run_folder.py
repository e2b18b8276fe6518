"""A folder run: its cases, its output folder, and what makes it safe to repeat and to share — atomic writes of each
case with its provenance last, one writer at a time, and resumption keyed on what the inputs hold, not their names.

- :func:`list_cases`: cases from a file, a DICOM series folder, or a folder of scans (two folders paired by name for
  tasks of two sources); :func:`write_case`: a case's outputs, then its provenance (a case is finished when its
  provenance exists); :func:`finished`: the same settings on the same input content.

- :func:`folder_lock`: an exclusive ``flock`` on ``<output>/.medidiff-lock`` for the whole run. Two runs into one
  folder used to both finish, the second silently replacing the first's results; now the second stops at once.
  The kernel drops the lock when its process dies (``kill -9`` included), so nothing stale is left to clear.
- :func:`input_digest`: SHA-256 of a case's source files (every file of a DICOM series folder, with its name), kept
  in the provenance; a case whose input was replaced under the same name is done again, not skipped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from medidiff import io
from medidiff.errors import MedidiffError
from medidiff.tasks import Case, Output, Task

LOCK_NAME = ".medidiff-lock"
_CHUNK = 1 << 20


@contextlib.contextmanager


def folder_lock(output: Path) -> Iterator[None]:
    """Hold the output folder for this run; another run holding it is a :class:`MedidiffError`. The lock file is
    removed when the run ends."""
    path = output / LOCK_NAME
    handle = _locked(path, output)
    try:
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no other run can have taken it in between
        handle.close()


def _locked(path: Path, output: Path):
    while True:
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as err:
            raise MedidiffError(f"cannot create its lock file ({err.strerror})", output) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise MedidiffError("another medidiff run is writing into this folder; wait for it to finish or "
                                    "choose another --output", output) from None
            raise
        if _same_file(handle, path):
            return handle
        handle.close()  # a run that just ended removed the file we locked: take the new one


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def input_digest(sources: Mapping[str, Path]) -> dict[str, str]:
    """``{role: sha256}`` of each source: a file's bytes, or a folder's files (names and bytes, in name order)."""
    return {role: _digest(Path(path)) for role, path in sources.items()}


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()


def list_cases(inputs: Mapping[str, str | os.PathLike]) -> list[Case]:
    """Cases from one source per role: a file, a DICOM series folder (one case), or a folder of scans (one
    case per file); with two roles (fusion), two files or two folders whose files pair by case name."""
    listed = {role: _sources(Path(path)) for role, path in inputs.items()}
    first, *others = listed
    for role in others:
        for mine, theirs, folder in ((listed[first], listed[role], inputs[role]),
                                     (listed[role], listed[first], inputs[first])):
            missing = sorted(set(mine) - set(theirs))
            if missing and len(mine) + len(theirs) > 2:
                raise MedidiffError(f"has no partner named '{missing[0]}.*' in {folder}", mine[missing[0]])
    if len(listed[first]) == 1 and all(len(listed[r]) == 1 for r in others):
        return [Case(next(iter(listed[first])), {role: next(iter(s.values())) for role, s in listed.items()})]
    return [Case(name, {role: listed[role][name] for role in listed}) for name in sorted(listed[first])]


def _sources(path: Path) -> dict[str, Path]:
    """``{case name: file}``; a case name is the file name without its image extension (nothing else
    stripped, so ``case1.nii.gz`` and ``case1_seg.nii.gz`` are two cases)."""
    if not path.exists():
        raise MedidiffError("input not found", path)
    if not (path.is_file() or path.is_dir()):
        raise MedidiffError("is not a regular file or folder (a FIFO, socket or device?); give a scan file or a "
                            "folder of scans", path)
    if path.is_file() or io.is_dicom_folder(path):
        return {case_of(path.resolve()): path}  # resolved: `--input .` names the case after the folder
    found: dict[str, Path] = {}
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        name = case_of(file)
        if name in found:
            raise MedidiffError(f"two inputs make one case '{name}': {found[name].name} and {file.name}", path)
        found[name] = file
    if not found:
        raise MedidiffError("folder holds no input files", path)
    return found


def case_of(path: Path) -> str:
    from medidiff.metrics.evaluate import case_name

    return case_name(path.name, suffixes=()) or path.name


def check_output_dir(output: Path, sources: list[Path]) -> None:
    """Create the output folder after refusing one that is an input, lies inside a DICOM input or holds the
    inputs (results there could overwrite an input, and a later run would take them for inputs)."""
    target = output.resolve()
    for path in sources:
        source = path.resolve()
        if target == source or (path.is_dir() and target.is_relative_to(source)):
            raise MedidiffError(f"output folder must not be an input or inside one (input {path})", output)
        if path.is_file() and target == source.parent:
            raise MedidiffError(f"output folder holds the input {path.name}; choose a separate folder so that no "
                                "input can be overwritten", output)
    if output.exists() and not output.is_dir():
        raise MedidiffError("output must be a folder, but a file of that name exists", output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedidiffError(f"cannot create the output folder ({err.strerror})", output) from None
    if not os.access(output, os.W_OK):
        raise MedidiffError("output folder is not writable", output)


def write_case(task: Task, case: Case, outputs: dict[str, Output], output: Path,
               info: dict[str, Any]) -> list[Path]:
    """Write a case's outputs, then its provenance; an interruption removes what the case had written.

    Layout: the main output is ``<output>/<case>.nii.gz`` (``.png`` for fused 2D image files), so the folder can
    be given to ``medidiff evaluate`` as is; the others ``<output>/<name>/<case>.nii.gz``, PNG previews of 2D
    inputs ``<output>/png/<case>_<name>.png``, and ``<output>/provenance/<case>.json`` last.
    """
    source = case.sources[task.roles[0]]
    # a DICOM series has no file to copy the geometry from: the scan as read carries it (not the resampled one)
    like = source if source.is_file() else case.raw[task.roles[0]]
    written: list[Path] = []
    try:
        for index, (name, out) in enumerate(outputs.items()):
            if index == 0 and _png_main(task, case):
                written.append(io.write_png(out.array, output / f"{case.name}.png", value_range=(0.0, 1.0)))
                continue
            folder = output if index == 0 else output / name
            written.append(io.write(out.array, folder / f"{case.name}.nii.gz", like=like, spacing=out.spacing))
            if out.array.ndim == 3 and not task.png_main:
                # a PNG holds one or three channels: the first three of a map with more, the first of two
                shown = out.array[:3] if out.array.shape[0] >= 3 else out.array[:1]
                written.append(io.write_png(shown.float(), output / "png" / f"{case.name}_{name}.png",
                                            value_range=_preview_range(out, name)))
        info = info | {"outputs": [str(p) for p in written]}
        written.append(io.write_json(provenance_path(output, case.name), info))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _png_main(task: Task, case: Case) -> bool:
    return task.png_main and case.sources[task.roles[0]].name.lower().endswith(io.IMAGE_2D_SUFFIXES)


def _preview_range(out: Output, name: str) -> tuple[float, float] | None:
    if out.kind == "label":
        return 0.0, float(max(int(out.array.max()), 1))
    return (0.0, 1.0) if name == "prob" else None


def provenance_path(output: Path, case: str) -> Path:
    return output / "provenance" / f"{case}.json"


def finished(output: Path, case: Case, settings: dict[str, Any]) -> bool:
    """True for a case finished with these settings on these very inputs (same content, not only the same
    name); a case finished with other settings is refused."""
    earlier = _provenance(output, case)
    if earlier is None:
        return False
    if earlier.get("settings") != io.strict_json(settings):
        differ = sorted(k for k in set(settings) | set(earlier.get("settings") or {})
                        if (earlier.get("settings") or {}).get(k) != settings.get(k))
        raise MedidiffError(f"holds results of a run with other settings ({', '.join(differ)} differ); write this "
                            "run to another --output folder", output)
    return earlier.get("input_sha256") == input_digest(case.sources)


def _provenance(output: Path, case: Case) -> dict[str, Any] | None:

    path = provenance_path(output, case.name)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an unreadable record: the case is done again
    return record if isinstance(record, dict) else None
