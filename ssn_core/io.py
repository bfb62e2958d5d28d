"""File writes that never lose work: atomic files, and result folders that replace only what SSN Lab wrote.

- `atomic_write_text` / `atomic_write_json` / `atomic_save_safetensors`: a crash or a cancel never leaves a
  half-written file behind (temporary name next to the target, then one rename).
- `check_out_dir(path, kind)`: may a result of ``kind`` be written to ``path``? Yes for a new path, an empty
  folder, or an earlier SSN Lab result of the same kind (its ``manifest.json`` names the kind and it holds only
  the files that result wrote); anything else is an `SSNError`, raised before any work is done.
- `writing_result_dir(path, kind)`: a context manager yielding a fresh temporary folder next to ``path``; on
  success the folder gets a ``manifest.json`` stamped with ``format`` (the kind) and ``files`` (what it holds)
  and replaces ``path`` as a whole, so a result folder always describes exactly one run.

New files and folders get the modes the user's umask gives (tempfile alone would make them private).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssn_core.errors import SSNError

if TYPE_CHECKING:  # torch and safetensors are imported where they are used: `ssn --help` stays fast
    import torch

RESULT_MANIFEST = "manifest.json"

# ----------------------------------------------------------------------------------------------
# Modes: what open() / mkdir() would have given under the current umask


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by tempfile (0600 / 0700) the mode the umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


# ----------------------------------------------------------------------------------------------
# Atomic files


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp_name)
        apply_umask(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic_replace(Path(path), write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, error: type[Exception]) -> Any:
    """The JSON value in a user's file, or ``error`` saying the file is not valid JSON (never a decoder traceback)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(contiguous, tmp, metadata=metadata))


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows as CSV text with the given columns (missing or None values empty), for atomic_write_text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Result folders


def describe_kind(kind: str) -> str:
    """``ssn-lab/identify-result`` -> ``identify result`` (for messages)."""
    return kind.removeprefix("ssn-lab/").replace("-", " ")


def result_kind(manifest: Any) -> str | None:
    """The kind a result manifest declares: ``format``, else ``kind``, else ``extra.kind`` (older manifests)."""
    if not isinstance(manifest, dict):
        return None
    extra = manifest.get("extra")
    for value in (manifest.get("format"), manifest.get("kind"), extra.get("kind") if isinstance(extra, dict) else None):
        if isinstance(value, str) and value:
            return value
    return None


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """``folder/manifest.json`` as a dict, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(folder) / RESULT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tree(folder: Path) -> tuple[list[str], list[str]]:
    """(files, folders) under ``folder`` as sorted POSIX paths relative to it; links count as files."""
    files, folders = [], []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for name in list(dirs):
            if os.path.islink(os.path.join(root, name)):  # never descend into a link
                dirs.remove(name)
                names.append(name)
            else:
                folders.append((rel_root / name).as_posix())
        files += [(rel_root / name).as_posix() for name in names]
    return sorted(files), sorted(folders)


def _unlisted(folder: Path, manifest: dict) -> list[str]:
    """Entries of an earlier result that its manifest does not list (files a user added); [] for older
    manifests that list nothing."""
    listed = manifest.get("files")
    if not isinstance(listed, list):
        return []
    listed_set = {str(x) for x in listed}
    parents = {p.as_posix() for name in listed_set for p in Path(name).parents}
    files, folders = _tree(folder)
    return [f for f in files if f not in listed_set] + [d for d in folders if d not in parents]


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_out_dir(path: str | os.PathLike, kind: str) -> Path:
    """The output folder ``path`` (``~`` expanded), after checking that a ``kind`` result written there loses
    nothing. Raises SSNError, before any work is done, unless ``path``

    - does not exist yet and its nearest existing parent is a writable folder,
    - is an empty folder, or
    - is an earlier SSN Lab result of the same ``kind`` (``manifest.json`` says so) that holds only the files
      listed in its manifest (a file a user added there is never deleted).

    The current folder, its parents and the home folder are always refused: a result replaces its folder as
    a whole.
    """
    text = os.fspath(path)
    what = describe_kind(kind)
    if not str(text).strip():
        raise SSNError(f"no output folder given for the {what}; pass a new folder name such as runs/{what.split()[0]}")
    out = Path(text).expanduser()
    absolute = Path(os.path.abspath(out))
    if absolute == Path(absolute.anchor) or absolute == Path.home().absolute():
        raise SSNError(f"refusing to write the {what} into {out}: give a new folder for it (such as "
                       f"runs/{what.split()[0]}); SSN Lab replaces its output folder as a whole")
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and os.path.exists(absolute) and (
            absolute.resolve() == cwd or absolute.resolve() in cwd.parents):
        raise SSNError(f"refusing to write the {what} into {out}: it is the current folder or one of its parents, and "
                       f"SSN Lab replaces its output folder as a whole; give a new folder such as "
                       f"runs/{what.split()[0]}")
    if out.is_symlink():
        raise SSNError(f"{out} is a symbolic link; give a real folder for the {what}")
    if os.path.lexists(out):
        if not out.is_dir():
            raise SSNError(f"{out} exists and is not a folder; SSN Lab never replaces a file with a result folder. "
                           f"Give a new folder name for the {what}")
        try:
            entries = os.listdir(out)
        except OSError as exc:
            raise SSNError(f"cannot read the output folder {out}: {exc.strerror or exc}") from None
        if entries:
            manifest = read_manifest(out)
            found = result_kind(manifest)
            if manifest is None or found != kind:
                why = (f"it is an SSN Lab {describe_kind(found)}" if found else
                       "it has no SSN Lab manifest.json" if manifest is None else "its manifest.json names no kind")
                raise SSNError(f"{out} is not empty and is not an earlier {what} ({why}); SSN Lab only replaces its "
                               f"own earlier results of the same kind. Give a new or empty folder")
            extra = _unlisted(out, manifest)
            if extra:
                shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
                raise SSNError(f"{out} is an earlier {what} but also holds files it did not write ({shown}); move "
                               f"them elsewhere or give another folder")
        parent = absolute.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SSNError(f"cannot replace {out}: its folder {parent} is not writable")
    else:
        base = _nearest_existing(absolute.parent)
        if not base.is_dir():
            raise SSNError(f"cannot create the output folder {out}: {base} is not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise SSNError(f"cannot create the output folder {out}: {base} is not writable")
    return out


def stamp_manifest(folder: str | os.PathLike, kind: str) -> dict:
    """Write ``folder/manifest.json`` with ``format`` = kind and ``files`` = every file the folder holds."""
    folder = Path(folder)
    manifest = read_manifest(folder) or {}
    declared = result_kind(manifest)
    if declared not in (None, kind):
        raise ValueError(f"manifest of kind {declared!r} written into a {kind!r} result")  # a bug, not a user error
    manifest = {"format": kind, **{k: v for k, v in manifest.items() if k not in ("format", "files")}}
    from ssn_core.distributed import world

    manifest.setdefault("processes", world().size)  # a multi-process launch records how many processes shared the work
    files, _ = _tree(folder)
    manifest["files"] = sorted({*files, RESULT_MANIFEST})
    atomic_write_json(folder / RESULT_MANIFEST, manifest)
    return manifest


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM during a few renames that must happen together; re-deliver them after.

    Only the main thread can own signal handlers; elsewhere (app worker threads) this does nothing, and those
    threads never receive KeyboardInterrupt anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []
    previous: dict[int, Callable[..., Any] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not settable here
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for signum, frame in received[:1]:
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def swap_dir(tmp: str | os.PathLike, final: str | os.PathLike, check: Callable[[], object] | None = None) -> None:
    """Put the complete folder ``tmp`` at ``final``. An existing ``final`` is renamed aside first and removed only
    once ``tmp`` is in place (renamed back if that fails); Ctrl-C is held in between, so an interrupt leaves either
    the old folder or the new one. ``check()`` (raising when ``final`` may not go) runs before each attempt."""
    tmp, final = Path(tmp), Path(final)
    with deferred_interrupts():
        for _ in range(3):  # another writer may create `final` between the check and the rename
            if check is not None:
                check()
            aside = None
            if os.path.lexists(final):
                aside = final.parent / f".{final.name}.{secrets.token_hex(4)}.old"
                _rename(final, aside)
            try:
                _rename(tmp, final)
            except OSError as exc:
                if aside is not None:
                    _rename(aside, final)
                elif exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue
                raise
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            return
        raise OSError(errno.EEXIST, f"{final} keeps being recreated by another process")


def replace_result_dir(tmp: str | os.PathLike, final: str | os.PathLike, kind: str) -> Path:
    """Move the finished result folder ``tmp`` to ``final``, replacing only what `check_out_dir` allows (checked
    again here: the folder may have changed while the job ran)."""
    final = Path(final).expanduser()
    try:
        swap_dir(tmp, final, check=lambda: check_out_dir(final, kind))
    except OSError as exc:
        raise SSNError(f"could not move the {describe_kind(kind)} into {final}: {exc.strerror or exc}") from None
    return final


@contextmanager
def writing_result_dir(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """``with writing_result_dir(out, kind) as tmp:`` write the result's files into ``tmp``; on success they
    replace ``out`` as one folder (see `check_out_dir`), with a stamped manifest. On any error or interrupt the
    temporary folder is removed and ``out`` is left as it was.

    Under a multi-process launch (`ssn_core.distributed`) only process 0 writes: the others get a throwaway folder
    that is removed after the block, so the same code runs everywhere and ``out`` is written once."""
    from ssn_core import distributed

    final = check_out_dir(path, kind)
    if not distributed.is_main():
        with tempfile.TemporaryDirectory(prefix=".ssn-not-main-") as scratch:
            yield Path(scratch)
        return
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        apply_umask(tmp, directory=True)
    except OSError as exc:
        raise SSNError(f"cannot write the {describe_kind(kind)} to {final}: {exc.strerror or exc}") from None
    try:
        yield tmp
        stamp_manifest(tmp, kind)
        replace_result_dir(tmp, final, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Reading


def not_a_file_message(path: Path, what: str, hint_names: Sequence[str] = ()) -> str:
    """Why ``path`` cannot be read as a ``what`` file: missing, or a folder (naming a file inside that fits)."""
    if path.is_dir():
        inside = [path / name for name in hint_names if (path / name).is_file()]
        hint = f"; did you mean {inside[0]}?" if inside else ""
        return f"{path} is a folder, not a {what} file{hint}"
    return f"{what} file not found: {path}"


def read_safetensors(path: str | os.PathLike, expected_format: str,
                     what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of an SSN Lab safetensors file, never unpickling anything.

    Raises NeuronFileError with a one-line reason when the file is missing, unreadable, or not ``expected_format``
    (``what`` names the kind of file in the message: "score table", "neuron set", "delta").
    """
    from safetensors import SafetensorError, safe_open

    from ssn_core.errors import NeuronFileError

    path = Path(path)
    if not path.is_file():
        raise NeuronFileError(not_a_file_message(path, what, ("delta.safetensors", "scores.safetensors")))
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as exc:
        raise NeuronFileError(f"{path} is not a readable safetensors file: {exc}") from None
    if header.get("format") != expected_format:
        raise NeuronFileError(f"{path} is not an SSN Lab {what} (missing format {expected_format!r})")
    return header, tensors
