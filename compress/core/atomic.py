"""Atomic outputs: write beside the target, then rename, so a failed run leaves the old output as it was."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from compress.core.errors import InputError, UsageError, few
from compress.core.interrupt import check_interrupted


def input_paths(inputs: Iterable[str | os.PathLike | None]) -> list[Path]:
    """The files and folders behind a command's inputs: a MODEL spec `file.py:factory` is its file."""
    paths = []
    for inp in inputs:
        if inp is None:
            continue
        p = Path(inp).expanduser()
        if not p.exists() and ":" in str(inp):
            p = Path(str(inp).rpartition(":")[0]).expanduser()
        if p.exists():  # a device name, package.module:factory or a missing file: nothing on disk to protect
            paths.append(p)
    return paths


def _probe_writable(folder: Path, out: str | os.PathLike) -> None:
    """Create and remove a file in `folder`: os.access says yes to root even on read-only mounts and /proc."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write {out}: {folder} is not a writable folder ({e.strerror or type(e).__name__})") from None


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *, flag: str = "-o",
                      folder: bool = False, overwrite: bool = False) -> Path:
    """Refuse an output that would overwrite an input, or that lies where nothing can be written.

    folder=True is for outputs that replace a whole folder (`compress run -o DIR`): an input inside DIR, or a
    DIR holding anything its run manifest does not list (see foreign_files), would be deleted with it, so
    both are refused; with `overwrite` a folder of other files is accepted (the run moves it aside whole).
    """
    out_p = Path(out).expanduser()
    try:
        out_r = out_p.resolve()
    except OSError:
        out_r = out_p.absolute()
    for inp in input_paths(inputs):
        try:
            inp_r = inp.resolve()
        except OSError:
            continue
        if out_r == inp_r:
            raise UsageError(f"{flag} {out} is also an input; choose another output path")
        if folder and inp_r.is_relative_to(out_r):
            raise UsageError(f"{flag} {out} holds the input {inp}, and the run replaces that whole folder; choose another folder")
    if folder and not overwrite:
        foreign = foreign_files(out_p)
        if foreign:
            raise UsageError(f"{flag} {out} is a folder with other files in it ({few(foreign)}), and the run "
                             "replaces that whole folder; give a new or empty folder, an earlier run's output, or "
                             "--overwrite to move it aside")
    parent = out_p.parent if str(out_p.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {out}: {existing} is not a folder")
    _probe_writable(existing, out)
    return out_p


def check_json_output(json_out: str | None, output: str | os.PathLike | None,
                      inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """--json FILE must not overwrite an input or the command's -o output ('-' is stdout)."""
    if not json_out or json_out == "-":
        return
    if output is not None and Path(json_out).expanduser().absolute() == Path(output).expanduser().absolute():
        raise UsageError(f"--json {json_out} is also the -o output; choose another path")
    check_output_path(json_out, inputs, flag="--json")


def check_onnx_output(out: str, inputs: list[str | os.PathLike | None] = ()) -> Path:
    """check_output_path for a command whose -o is one .onnx file."""
    path = check_output_path(out, inputs)
    if not str(out).lower().endswith(".onnx"):
        raise UsageError(f"-o {out}: the output must end in .onnx")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it onto the target only if the block succeeds."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{target.name}.partial-"
        _sweep_stale(target.parent, prefix)
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=suffix + ".tmp", dir=target.parent)
    except OSError as e:
        raise InputError(f"cannot write {target}: {e.strerror or type(e).__name__}") from None
    os.close(fd)
    tmp_p = Path(tmp)
    os.chmod(tmp_p, default_mode(0o666))  # mkstemp makes 0600; an output file gets the usual permissions
    try:
        yield tmp_p
        check_interrupted()
        os.replace(tmp_p, target)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside the target; its files are moved into the target folder on success.

    Used where one output is several files (an ONNX model with external data): each file is renamed
    into place only after all of them were written, and `last` (the file that refers to the others)
    goes last, so a reader never finds it before its data.
    """
    target = Path(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = partial_dir(target, "")
    except OSError as e:
        raise InputError(f"cannot write into {target}: {e.strerror or type(e).__name__}") from None
    os.chmod(tmp, default_mode(0o777))
    try:
        yield tmp
        check_interrupted()
        for f in sorted(tmp.iterdir(), key=lambda f: (f.name == last, f.name)):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Every file a run folder holds, as its run wrote it: the folder is replaced whole by the next run only when it
# holds nothing else. A report.json alone proves nothing (a user's folder may hold one, and its notes beside it).
MANIFEST = ".edge-compress-run.json"
MANIFEST_SCHEMA = "edge-compress/run-folder/1"


def write_manifest(folder: Path, names: Iterable[str] | None = None) -> None:
    """List every entry of FOLDER (the finished run folder, before it is swapped in), itself included; or, for a
    folder a command fills over time (a search's), the NAMES it will write there."""
    listed = {p.name for p in folder.iterdir()} if names is None else set(names)
    write_json(folder / MANIFEST, {"schema": MANIFEST_SCHEMA, "files": sorted(listed | {MANIFEST})})


def claim_folder(folder: Path, names: Iterable[str], flag: str = "-o") -> None:
    """Make FOLDER (new, empty, or one this command made before) the home of NAMES, by its manifest.

    For outputs written into a folder rather than swapped in whole (`compress search/sweep -o`): a folder holding
    anything its manifest does not list is the user's, and is refused before a file is written into it."""
    check_foreign(folder, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write into {folder}: {e.strerror or type(e).__name__}") from None
    write_manifest(folder, names)


def check_foreign(folder: Path, flag: str = "-o") -> None:
    """UsageError when FOLDER holds files that no manifest of ours lists."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file; give a folder")
    foreign = foreign_files(folder)
    if foreign:
        raise UsageError(f"{flag} {folder} is a folder with other files in it ({few(foreign)}); give a new or "
                         "empty folder, or one this command wrote before")


def foreign_files(folder: Path) -> list[str]:
    """What in FOLDER a run did not write: everything, when it has no valid manifest; [] for a missing or
    empty folder."""
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return []
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = set(manifest["files"]) if manifest.get("schema") == MANIFEST_SCHEMA else set()
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        listed = set()
    return [n for n in names if n not in listed]


def move_aside(folder: Path) -> Path:
    """--overwrite: the old folder renamed to FOLDER.old-N beside it, whole; never a delete of what is in it."""
    n = 1
    while (aside := folder.with_name(f"{folder.name}.old-{n}")).exists() or aside.is_symlink():
        n += 1
    os.replace(folder, aside)
    return aside


_PARTIAL = re.compile(r"\.partial-(\d+)-[^/]*$")


def partial_dir(parent: Path, name: str) -> Path:
    """A new work folder `.{name}.partial-PID-XXXX` in PARENT, for an output that is swapped in when finished.

    First removes the work folders of the same output that a process no longer alive left there (killed with
    SIGKILL, or a machine that went down): they are ours by name and PID, and nothing else is ever removed."""
    prefix = f".{name}.partial-" if name else ".partial-"
    _sweep_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _sweep_stale(parent: Path, prefix: str) -> None:
    """Remove PARENT's `{prefix}PID-*` work files and folders whose process is gone."""
    for old in parent.glob(f"{glob.escape(prefix)}*"):
        m = _PARTIAL.search(old.name)
        if not m or old.is_symlink() or _alive(int(m.group(1))):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_file():
            with contextlib.suppress(OSError):
                old.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def default_mode(base: int) -> int:
    """`base` with the process umask applied, as open()/mkdir() would give."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (indent 2, trailing newline)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def swap_in(work: Path, outdir: Path) -> None:
    """Replace OUTDIR by the finished folder with two renames; the old one is removed only afterwards.

    An OUTDIR that is a symlink is replaced as a link: the link goes, the folder it pointed to stays as it was.
    Nothing is left beside OUTDIR; what cannot be removed is said, not ignored."""
    check_interrupted()
    old = None
    if outdir.exists() or outdir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old-", dir=outdir.parent))
        os.rmdir(old)
        os.replace(outdir, old)
    os.replace(work, outdir)
    if old is not None:
        try:
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old)
        except OSError as e:  # the new folder is in place; the old one is the user's to remove
            sys.stderr.write(f"warning: the previous {outdir.name} could not be removed, it is at {old}: "
                             f"{e.strerror or e}\n")
