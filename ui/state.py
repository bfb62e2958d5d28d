"""Model loading shared by all browser sessions, and per-session state.

One copy of each model lives in `st.cache_resource` (shared by every session, so a classroom of
browsers does not load the model thirty times). Everything a session computes (neuron sets, chat
history, jobs, interventions) lives in that session's `st.session_state`; interventions are hooks
that only run in the thread/context that entered them (`ssn_core.hooks`), so sessions never see each
other's edits on the shared model.

Pages read and write that state through one typed object, `session` (a `Session`): every value that is not a
widget's own has an attribute there, with its type, and whether it belongs to the loaded model (dropped by
`forget_results` when the model changes). Widget values stay under their widget keys (``PERSISTED_WIDGETS``).

Model sources understood here, on top of those of `ssn_core.loading`:

- ``tiny:<family>``: a tiny random model from `ssn_core.testing` (app tests, browser tests, demos
  without weights). ``SSN_APP_MODEL=tiny:qwen2 streamlit run app.py`` makes it the default.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import streamlit as st

from ssn_core.loading import DEFAULT_STARTER

if TYPE_CHECKING:
    from ssn_core.delta import NeuronDelta
    from ssn_core.faithfulness import FaithfulnessResult
    from ssn_core.identify import IdentifyResult
    from ssn_core.neurons import NeuronSet
    from ssn_core.prompts import PromptSet
    from ssn_core.scoring import ScoreTable
    from ssn_core.training import StudyResult
    from ssn_core.validation import ValidationResult
    from ui.jobs import Job

T = TypeVar("T")


def default_source() -> str:
    """The model loaded when a session starts: $SSN_APP_MODEL, else the offline starter model."""
    return os.environ.get("SSN_APP_MODEL", "").strip() or DEFAULT_STARTER


def autoload_enabled() -> bool:
    return os.environ.get("SSN_APP_AUTOLOAD", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class SpecKey:
    """Hashable description of a model to load (the `st.cache_resource` key)."""

    source: str
    dtype: str = "auto"
    quantization: str = "none"
    device_map: str = "auto"
    trust_remote_code: bool = False

    def label(self) -> str:
        extras = [x for x in (self.dtype if self.dtype != "auto" else "",
                              self.quantization if self.quantization != "none" else "") if x]
        return self.source + (f" ({', '.join(extras)})" if extras else "")


def _build(key: SpecKey, progress=None):
    """Load a model (uncached). Raises SSNError subclasses for user-caused failures."""
    if key.source.startswith("tiny:"):
        from ssn_core.errors import ModelLoadError
        from ssn_core.testing import TINY_FAMILIES, tiny_model

        family = key.source.split(":", 1)[1].strip() or "qwen2"
        if family not in TINY_FAMILIES:
            raise ModelLoadError(f"no tiny model family {family!r}; known: {', '.join(TINY_FAMILIES)}")
        return tiny_model(family)
    from ssn_core.loading import ModelSpec, load_model

    spec = ModelSpec(source=key.source, dtype=key.dtype, quantization=key.quantization,
                     device_map=key.device_map, trust_remote_code=key.trust_remote_code)
    return load_model(spec, progress=progress)


@st.cache_resource(show_spinner=False, max_entries=2)
def _load_cached(source: str, dtype: str, quantization: str, device_map: str, trust_remote_code: bool,
                 _progress=None):
    return _build(SpecKey(source, dtype, quantization, device_map, trust_remote_code), _progress)


def _args(key: SpecKey) -> tuple:
    return (key.source, key.dtype, key.quantization, key.device_map, key.trust_remote_code)


def load(key: SpecKey, progress=None):
    """Load (or fetch from the shared cache) and make it this session's model.

    ``progress(done, total, message)`` is called while a model is assembled / loaded (not on a cache hit).
    """
    lm = _load_cached(*_args(key), _progress=progress)
    changed = session.model_key != key
    if changed:
        forget_results()
    session.model_key = key
    if changed:  # the bundled starter neuron set, when this model has one (`ui.bundle`)
        from ui import bundle

        bundle.install(lm)
    return lm


@st.cache_resource(show_spinner=False, max_entries=4)
def _speed_cached(source: str, dtype: str, quantization: str, device_map: str, trust_remote_code: bool):
    from ssn_core.speed import measure_speed

    return measure_speed(_load_cached(source, dtype, quantization, device_map, trust_remote_code))


def model_speed():
    """The loaded model's measured speed (`ssn_core.speed.ModelSpeed`, measured once per model), or None."""
    key = current_key()
    if key is None:
        return None
    try:
        with st.spinner("Measuring this model's speed (once, a few seconds)…"):
            return _speed_cached(*_args(key))
    except Exception:  # noqa: BLE001 - a hint is a convenience; the page works without it
        return None


def current_key() -> SpecKey | None:
    return session.model_key


def current_model():
    """This session's LoadedModel, or None when nothing is loaded."""
    key = current_key()
    if key is None:
        return None
    try:
        return _load_cached(*_args(key))
    except Exception:  # noqa: BLE001 - e.g. another session unloaded it and the files are gone
        del session.model_key
        return None


def unload() -> None:
    """Drop this session's model from the shared cache and free its memory."""
    key = current_key()
    if key is not None:
        _load_cached.clear(*_args(key))
        _speed_cached.clear(*_args(key))
    del session.model_key
    forget_results()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# This session's state


class Entry(Generic[T]):
    """One value of this browser session's `st.session_state`, under the name of the `Session` attribute it is.

    ``per_model``: computed on the loaded model, so `forget_results` drops it when the model changes. ``default``:
    a factory for a container that pages fill in place (a list or dict is created on first read and kept).
    """

    def __init__(self, *, per_model: bool, default: Callable[[], T] | None = None) -> None:
        self.per_model = per_model
        self.default = default
        self.key = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, obj: object, owner: type | None = None) -> T | None:
        if obj is None:
            return self  # type: ignore[return-value] - the class attribute itself (`Session.entries`)
        if self.default is not None:
            return st.session_state.setdefault(self.key, self.default())
        return st.session_state.get(self.key)

    def __set__(self, obj: object, value: T | None) -> None:
        st.session_state[self.key] = value

    def __delete__(self, obj: object) -> None:
        st.session_state.pop(self.key, None)  # deleting what is not there is fine: "forget it"


@dataclass
class FineTuneRun:
    """A finished Fine-tune job: the study, the form's settings it ran with and the job's phases (for the page)."""

    study: StudyResult
    settings: dict = field(default_factory=dict)
    phases: list[dict] = field(default_factory=list)


class Session:
    """The state of this browser session that is not a widget's value: results, jobs, the chat, the model's key.

    The key in `st.session_state` is the attribute's name (AppTests read ``at.session_state["identify_result"]``).
    Deleting an attribute removes its key; reading one that was never set gives None (or its empty container).
    """

    # The loaded model (kept when the model changes: they describe the change itself)
    model_key: Entry[SpecKey] = Entry(per_model=False)
    autoload_tried: Entry[bool] = Entry(per_model=False)
    autoload_error: Entry[BaseException] = Entry(per_model=False)
    # Background jobs (`ui.jobs`: cancelled and dropped when the model changes)
    jobs: Entry[dict[str, Job]] = Entry(per_model=True, default=dict)
    # Neurons page
    identify_result: Entry[IdentifyResult] = Entry(per_model=True)
    identify_prompts: Entry[PromptSet] = Entry(per_model=True)
    identify_n: Entry[int] = Entry(per_model=False)  # prompts per language and label of the last run
    ablation_check: Entry[tuple[str, ScoreTable]] = Entry(per_model=True)  # (language, exact-ablation scores)
    dose_response: Entry[FaithfulnessResult] = Entry(per_model=True)
    dose_response_for: Entry[str] = Entry(per_model=True)  # the identification (its "created") it was run on
    neuron_sets_imported: Entry[dict[str, NeuronSet]] = Entry(per_model=True, default=dict)
    # The bundled starter set (`ui.bundle`)
    starter_bundle: Entry[IdentifyResult] = Entry(per_model=True)
    starter_bundle_folder: Entry[str] = Entry(per_model=True)
    starter_bundle_error: Entry[BaseException] = Entry(per_model=True)
    # Validate and Fine-tune pages
    validation_result: Entry[ValidationResult] = Entry(per_model=True)
    train_result: Entry[FineTuneRun] = Entry(per_model=True)
    # Chat page
    chat_delta: Entry[NeuronDelta] = Entry(per_model=True)  # trained or loaded on the Fine-tune page
    chat_use_delta: Entry[bool] = Entry(per_model=False)  # "Use in chat" was pressed: pick the delta once
    chat_history: Entry[list[dict]] = Entry(per_model=True, default=list)
    chat_pending: Entry[dict] = Entry(per_model=True)  # the turn being generated (kept when a Stop reruns the page)
    # Learn page
    learn_demo: Entry[dict] = Entry(per_model=True)
    walkthrough: Entry[dict[str, dict]] = Entry(per_model=True, default=dict)  # step key -> its finished rows
    walkthrough_delta: Entry[tuple[str, NeuronDelta | None]] = Entry(per_model=True)  # (path, the bundle's delta)
    # Explorer page and the user's own sets
    custom_sets: Entry[dict[str, NeuronSet]] = Entry(per_model=True, default=dict)
    custom_set_active: Entry[str] = Entry(per_model=True)
    explorer_chat_neuron: Entry[str] = Entry(per_model=True)  # one neuron sent to the Chat page
    explorer_reports: Entry[dict] = Entry(per_model=True, default=dict)  # explanations and projections, by key
    explorer_tables: Entry[list[ScoreTable]] = Entry(per_model=True, default=list)
    explorer_set_reports: Entry[dict] = Entry(per_model=True, default=dict)
    explorer_linked: Entry[str] = Entry(per_model=False)  # the neuron of the last deep link (?neuron=...)
    explorer_picked: Entry[str] = Entry(per_model=False)  # clicked in a table: shown in the next run
    picked_rows: Entry[dict[str, str]] = Entry(per_model=False, default=dict)  # neuron table -> neuron last clicked

    @classmethod
    def entries(cls) -> list[Entry[Any]]:
        return [value for value in vars(cls).values() if isinstance(value, Entry)]


session = Session()


# Form and widget settings that survive a page change (Streamlit forgets a widget's value when its page is not
# shown; `keep_widget_state` re-stores these every run). Buttons and file uploaders cannot be set, so never here.
PERSISTED_WIDGETS: tuple[str, ...] = (
    "model_source_kind", "model_source_value", "model_dtype", "model_quant", "model_device", "model_trust",
    "nr_source", "nr_mj_path", "nr_grouping", "nr_langs_high", "nr_langs_medium", "nr_langs_low", "nr_langs_hr",
    "nr_langs_nhr", "nr_hr", "nr_recipe", "nr_p", "nr_n", "nr_batch", "nr_kinds", "nr_focus", "nr_table_set",
    "nr_search", "nr_abl_n", "nr_abl_lang", "nr_save_dir", "nr_import_dir", "nr_dose_langs", "nr_dose_n",
    "nr_dose_fractions", "nr_dose_generate",
    "chat_source", "chat_action", "chat_alpha", "chat_beta", "chat_random", "chat_layers", "chat_kinds", "chat_max_new",
    "chat_sample", "chat_temperature", "chat_seed", "chat_language", "chat_judge_language",
    "val_source", "val_langs", "val_limit", "val_seeds", "val_alpha", "val_tokens", "val_batch",
    "ft_target", "ft_languages", "ft_steps", "ft_lr", "ft_batch", "ft_n", "ft_eval", "ft_baselines",
    "learn_source", "learn_language", "learn_prompt", "learn_prompt_text", "learn_walk_source", "learn_walk_language",
    "ex_neuron", "ex_langs", "ex_n", "ex_k", "ex_set_source",
)
# ... of which these depend on the loaded model (its layers and sites, its results): dropped with the model.
MODEL_DEPENDENT_WIDGETS: tuple[str, ...] = (
    "nr_kinds", "nr_focus", "nr_table_set", "nr_abl_lang", "nr_dose_langs", "chat_source", "chat_layers", "chat_kinds",
    "val_source", "val_langs", "ft_target", "ft_languages", "learn_source", "learn_language", "learn_prompt",
    "learn_walk_source", "learn_walk_language", "ex_neuron",
    "ex_set_source",
)


def keep_widget_state() -> None:
    """Call at the top of every run (app.py): the persisted widgets keep their values across page changes."""
    for key in PERSISTED_WIDGETS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def keep_valid(key: str, options, multi: bool = False) -> None:
    """Drop a remembered value that the widget's current options no longer offer (another model, new results)."""
    if key not in st.session_state:
        return
    value, allowed = st.session_state[key], list(options)
    if multi:
        kept = [v for v in (value or []) if v in allowed]
        if kept != list(value or []):
            st.session_state[key] = kept
    elif value not in allowed:
        del st.session_state[key]


def forget_results() -> None:
    """Drop everything computed on the loaded model (its results, jobs and model-dependent widget values)."""
    for job in session.jobs.values():
        job.cancel.set()
    for entry in Session.entries():
        if entry.per_model:
            st.session_state.pop(entry.key, None)
    for name in MODEL_DEPENDENT_WIDGETS:
        st.session_state.pop(name, None)
