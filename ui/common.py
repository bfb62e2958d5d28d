"""Small page helpers shared by all pages: model guard, error display, downloads."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from ssn_core.errors import SSNError
from ui import state

PAGE_PATHS = {
    "model": "app_pages/1_model.py",
    "neurons": "app_pages/2_neurons.py",
    "explorer": "app_pages/7_explorer.py",
    "chat": "app_pages/3_chat.py",
    "validate": "app_pages/4_validate.py",
    "finetune": "app_pages/5_finetune.py",
    "learn": "app_pages/6_learn.py",
}


def link(page: str, label: str, icon: str | None = None) -> None:
    """A link to another page (silently plain text where navigation is not available, e.g. unit tests)."""
    try:
        st.page_link(PAGE_PATHS[page], label=label, icon=icon)
    except Exception:  # noqa: BLE001 - page_link needs the multipage app; fall back to text
        st.markdown(f"→ **{label}**")


def require_model():
    """This session's model, or an explanation of what to do first and `st.stop()`."""
    lm = state.current_model()
    if lm is None:
        st.info("No model is loaded yet. Load one on the **Model** page first (the starter model works offline).")
        link("model", "Go to the Model page", icon=":material/memory:")
        st.stop()
    return lm


def show_error(exc: BaseException) -> None:
    """User-caused errors as a plain message; anything else as a message plus the traceback."""
    if isinstance(exc, SSNError):
        st.error(str(exc))
    else:
        st.error(f"Unexpected error: {type(exc).__name__}: {exc}")
        st.exception(exc)


def call(fn: Callable[..., Any], *args, **kwargs) -> Any | None:
    """fn(*args, **kwargs), or None after showing the error."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - shown to the user
        show_error(exc)
        return None


def uploaded_to_path(uploaded, directory: Path | None = None) -> Path:
    """Write a `st.file_uploader` file to a private temp dir (engine loaders take paths; never unpickled)."""
    directory = directory or Path(tempfile.mkdtemp(prefix="ssn-upload-"))
    name = Path(uploaded.name).name or "upload"
    path = directory / name
    path.write_bytes(uploaded.getvalue())
    return path


def load_upload(fn: Callable[..., Any], uploaded, *args, **kwargs) -> Any:
    """``fn(path_of_uploaded_file, *args, **kwargs)``; an error names the file the user chose, not the temp copy.

    Engine loaders take paths, so an upload is written to a private temp folder first; their messages would
    otherwise say ``/tmp/ssn-upload-…/bad_neurons.json``.
    """
    path = uploaded_to_path(uploaded)
    try:
        return fn(path, *args, **kwargs)
    except SSNError as exc:
        chosen = Path(uploaded.name).name or "the uploaded file"
        exc.args = tuple(str(a).replace(str(path), chosen).replace(str(path.parent), "the upload")
                         if isinstance(a, str) else a for a in exc.args) or (chosen,)
        raise
    finally:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass


def existing_folder(text: str, what: str = "folder") -> Path:
    """The folder a user typed, or an SSNError saying it does not exist / is not a folder."""
    path = Path(text.strip()).expanduser()
    if not path.exists():
        raise SSNError(f"{text.strip()} does not exist: check the {what} path")
    if not path.is_dir():
        raise SSNError(f"{text.strip()} is a file, not a {what}")
    return path


def file_bytes(save: Callable[[Path], Any], suffix: str) -> bytes:
    """Bytes of a file written by an engine ``save(path)`` (atomic writers need a real path)."""
    with tempfile.TemporaryDirectory(prefix="ssn-dl-") as tmp:
        path = Path(tmp) / f"out{suffix}"
        save(path)
        return path.read_bytes()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def csv_bytes(df) -> bytes:
    buffer = io.StringIO()
    df.to_csv(buffer, index=False)
    return buffer.getvalue().encode("utf-8")

