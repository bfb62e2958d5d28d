"""Small page helpers shared by all pages: the pages themselves, model guard, error display, downloads."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from ssn_core.errors import SSNError
from ui import state


@dataclass(frozen=True)
class Page:
    """One page of the app: its script, title, icon and URL (None: the default page, at the root URL)."""

    path: str
    title: str
    icon: str
    url_path: str | None = None


# THE list of pages, in navigation order (app.py builds `st.navigation` from it; links and page switches use its
# paths). The pages live in app_pages/, not pages/: with a pages/ folder Streamlit runs a deep link (/chat) as an
# old-style page, skipping app.py (no navigation, no model) until someone opens the root URL.
PAGES: dict[str, Page] = {
    "model": Page("app_pages/1_model.py", "Model", ":material/memory:"),
    "neurons": Page("app_pages/2_neurons.py", "Neurons", ":material/biotech:", "neurons"),
    "explorer": Page("app_pages/7_explorer.py", "Explorer", ":material/travel_explore:", "explorer"),
    "chat": Page("app_pages/3_chat.py", "Chat (A/B)", ":material/forum:", "chat"),
    "validate": Page("app_pages/4_validate.py", "Validate", ":material/bar_chart:", "validate"),
    "finetune": Page("app_pages/5_finetune.py", "Fine-tune", ":material/tune:", "finetune"),
    "learn": Page("app_pages/6_learn.py", "Learn", ":material/school:", "learn"),
}
PAGE_PATHS: dict[str, str] = {name: page.path for name, page in PAGES.items()}


def navigation_pages() -> list:
    """The `st.Page` objects of `PAGES`, for `st.navigation` (app.py)."""
    return [st.Page(page.path, title=page.title, icon=page.icon, url_path=page.url_path, default=page.url_path is None)
            for page in PAGES.values()]


def link(page: str, label: str, icon: str | None = None) -> None:
    """A link to another page (silently plain text where navigation is not available, e.g. unit tests)."""
    try:
        st.page_link(PAGE_PATHS[page], label=label, icon=icon)
    except Exception:  # noqa: BLE001 - page_link needs the multipage app; fall back to text
        st.markdown(f"→ **{label}**")


def model_page(title: str, intro: str):
    """A page that works on the loaded model: its title, what it does, and the model (`require_model`)."""
    st.title(title)
    st.write(intro)
    return require_model()


def stop_without_result(result: Any | None, job: Any | None, hint: str) -> None:
    """`st.stop()` here while there is no result to show; when no job is computing one either, say how to start it
    (``hint``)."""
    if result is None:
        if job is None:
            st.info(hint)
        st.stop()


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
        with contextlib.suppress(OSError):
            path.parent.rmdir()


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

