"""Streamlit helpers for the SSN Lab app. Everything here is UI glue: computations live in `ssn_core`."""
