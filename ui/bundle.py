"""The bundled starter neuron set in a session: found and loaded when its model is loaded, so that Chat, Validate and
Learn work from the first second.

`ssn_core.bundle.find_bundle` picks the bundle made on the loaded model (``assets/starter_neurons/<model>/`` or
``$SSN_STARTER_NEURONS``; same model source and fingerprint). `install` keeps it in the session as
`session.starter_bundle` and, when the session has no identification result yet, makes it the
`session.identify_result` too.
No asset folder, or no bundle for this model: nothing happens (the pages behave as without one).
"""

from __future__ import annotations

from pathlib import Path

from ui.state import session


def install(lm) -> object | None:
    """Load the bundle of ``lm`` (if any) into this session; returns it, or None."""
    from ssn_core.bundle import find_bundle, load_bundle

    del session.starter_bundle, session.starter_bundle_folder, session.starter_bundle_error
    try:
        folder = find_bundle(lm)
        if folder is None:
            return None
        result = load_bundle(folder, lm)
    except Exception as exc:  # noqa: BLE001 - a damaged bundle must not stop the app; the Neurons page says why
        session.starter_bundle_error = exc
        return None
    session.starter_bundle = result
    session.starter_bundle_folder = str(folder)
    if session.identify_result is None:
        session.identify_result = result
    return result


def current():
    """This session's bundled result (an `IdentifyResult` without scores), or None."""
    return session.starter_bundle


def folder() -> Path | None:
    value = session.starter_bundle_folder
    return Path(value) if value else None


def error() -> BaseException | None:
    return session.starter_bundle_error


def describe(result) -> str:
    """One line on where a bundle comes from (for captions)."""
    info = result.manifest.get("bundle") or {}
    recipe = (result.manifest.get("recipe") or {}).get("name") or result.manifest.get("method", "?")
    languages = ", ".join(result.ms) or "-"
    return (f"the bundled starter neuron set for `{info.get('model_source', '?')}` (recipe {recipe}; languages "
            f"{languages}; made {str(info.get('created', '?'))[:10]} with `make starter-neurons`)")


NO_SCORES = ("This is the bundled starter neuron set, and a bundle has no score table (it would take megabytes; only "
             "the sets, counts, overlap, refusal direction and English activation means are bundled), so there are "
             "no scores to show here. Run an identification (set-up above) or load a full result folder to see "
             "scores.")
