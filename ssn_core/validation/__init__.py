"""Causal validation: do the identified neurons carry safety, more than random neurons of the same shape?

For each language the same harmful prompts are answered under several conditions:

- ``baseline``         no intervention;
- ``suppress_ms``      the language's MS-Neurons set to 0;
- ``suppress_ss``      the language's SS-Neurons set to 0 (non-high-resource languages only);
- ``suppress_ss_all``  the union of all SS-Neurons set to 0;
- ``random_<target>``  as many random neurons as the target set has *in every (layer, site kind)*, set to 0,
                       for several seeds (the control: a big enough edit anywhere may break a small model);
- ``reinforce_ss``     the SS-Neurons (the union, for the high-resource language) scaled by alpha > 1.

Why packed batches: every (prompt, condition) pair is one row of one stream of batched generation, and each
condition is one `Intervention` whose ``rows`` mask selects its rows, so conditions share every forward pass instead
of costing one generation each (`run_packed`).

The evidence the paper needs is the *difference* to the control: `compare_to_control` says whether suppressing
the target lowers refusal by more than random suppression does, by more than the random seeds disagree.

One idea per module; every name is importable from ``ssn_core.validation`` as before the split:

- `conditions`: `Condition`, `random_matched` (the control), `shift_offsets`, `plan_conditions` (what one language
  runs), `SUPPRESS_TARGETS`, `PARTS`, `REINFORCE_SETS`.
- `packed`: `run_packed`, the replies of every text under every condition from one stream of batched generation;
  `run_packed_groups` (`PackedGroup`), the same for several (language, label) shares at once, as `validate` runs.
- `stats`: `correlation`, `compare_to_control`, the rates of a condition's verdicts, the paired difference to the
  random control (`paired_control_difference`), `summarize`.
- `result`: `ValidationResult` (table, rows, summary, manifest; its folder and text table), `RESULT_KIND`.
- `run`: `validate`, the entry point.
"""

from __future__ import annotations

from ssn_core.validation.conditions import (
    PARTS,
    REINFORCE_SETS,
    SUPPRESS_TARGETS,
    Condition,
    plan_conditions,
    random_matched,
    shift_offsets,
)
from ssn_core.validation.packed import PackedGroup, run_packed, run_packed_groups
from ssn_core.validation.result import RESULT_KIND, ROW_COLUMNS, TABLE_COLUMNS, ValidationResult
from ssn_core.validation.run import Progress, validate
from ssn_core.validation.stats import compare_to_control, correlation, paired_control_difference, summarize

__all__ = [
    "PARTS",
    "REINFORCE_SETS",
    "RESULT_KIND",
    "ROW_COLUMNS",
    "SUPPRESS_TARGETS",
    "TABLE_COLUMNS",
    "Condition",
    "PackedGroup",
    "Progress",
    "ValidationResult",
    "compare_to_control",
    "correlation",
    "paired_control_difference",
    "plan_conditions",
    "random_matched",
    "run_packed",
    "run_packed_groups",
    "shift_offsets",
    "summarize",
    "validate",
]
