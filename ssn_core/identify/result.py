"""`IdentifyResult`: the sets, scores, counts, overlap, direction, pairs and activation means of one identification,
as a result folder (saved atomically, loaded and checked against the model; a bundle is read without its scores)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ssn_core.direction import RefusalDirection
from ssn_core.errors import NeuronFileError
from ssn_core.io import atomic_write_json, atomic_write_text, read_json, writing_result_dir
from ssn_core.neurons import NeuronSet
from ssn_core.pairs import PromptPair, load_pairs, save_pairs
from ssn_core.scoring import ScoreTable
from ssn_core.sites import SiteMap

MANIFEST_FORMAT = "ssn-lab/identify-result"


@dataclass
class IdentifyResult:
    scores: ScoreTable | None  # None for a bundle (`ssn_core.bundle`: shipped without its score table)
    ms: dict[str, NeuronSet]
    ss: dict[str, NeuronSet]
    ss_all: NeuronSet
    ss_shared_all_nhr: NeuronSet
    counts: pd.DataFrame  # language, set, layer, kind, count
    overlap: pd.DataFrame  # MS overlap of all languages and SS overlap of the NHR languages (see overlap_table)
    manifest: dict = field(default_factory=dict)
    direction: RefusalDirection | None = None  # the positive control, found on the same prompts
    pairs: list[PromptPair] | None = None  # the (prompt, reply) pairs scored, when replies were used
    activations: ScoreTable | None = None  # mean |a| and mean a per neuron and group (the additive reinforcement)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.ms)

    @property
    def hr(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("hr", ()))

    def overlap_matrix(self, value: str = "intersection", of: str = "MS") -> pd.DataFrame:
        """Square language × language matrix of ``intersection`` counts or ``jaccard`` indices of the MS
        sets (``of="MS"``, every language) or the SS sets (``of="SS"``, NHR languages)."""
        langs = list(self.languages) if of == "MS" else list(self.ss)
        rows = self.overlap[self.overlap["set"] == of]
        return rows.pivot(index="language_a", columns="language_b", values=value).loc[langs, langs]

    def summary(self) -> pd.DataFrame:
        """One row per language: MS and SS counts (what the CLI prints)."""
        rows = []
        for lang, ms in self.ms.items():
            ss = self.ss.get(lang)
            rows.append({"language": lang, "role": "HR" if lang in self.hr else "NHR", "ms": len(ms),
                         "ss": len(ss) if ss is not None else None})
        return pd.DataFrame(rows, columns=["language", "role", "ms", "ss"]).astype({"ss": "Int64"})  # HR: <NA>

    # ----- files --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result folder atomically (a temp folder next to it, then one rename); an existing folder is
        only replaced when it is an earlier identify result (`ssn_core.io.check_out_dir`)."""
        with writing_result_dir(directory, MANIFEST_FORMAT) as tmp:
            self.write_files(tmp)
        return Path(directory).expanduser()

    def write_files(self, tmp: Path) -> None:
        """The result's files, written into the (temporary) folder ``tmp``; a bundle has no scores.safetensors."""
        if self.scores is not None:
            self.scores.save(tmp / "scores.safetensors")
        (tmp / "sets").mkdir()
        for lang, neurons in self.ms.items():
            neurons.save(tmp / "sets" / f"ms_{lang}.json")
        for lang, neurons in self.ss.items():
            neurons.save(tmp / "sets" / f"ss_{lang}.json")
        self.ss_all.save(tmp / "sets" / "ss_all.json")
        self.ss_shared_all_nhr.save(tmp / "sets" / "ss_shared_all_nhr.json")
        atomic_write_text(tmp / "counts.csv", self.counts.to_csv(index=False))
        atomic_write_text(tmp / "overlap.csv", self.overlap.to_csv(index=False))
        atomic_write_json(tmp / "manifest.json", self.manifest)
        if self.direction is not None:
            self.direction.save(tmp / "direction.safetensors")
        if self.activations is not None:
            self.activations.save(tmp / "activations.safetensors")
        if self.pairs is not None:
            save_pairs(tmp / "pairs.json", self.pairs, meta={"model_fingerprint": self.manifest.get(
                "model_fingerprint")})

    @classmethod
    def load(cls, directory: str | os.PathLike, sites: SiteMap | None = None) -> IdentifyResult:
        """Read a result directory; with ``sites``, check every file against the loaded model."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not directory.exists():
            raise NeuronFileError(f"{directory} does not exist (give the folder an identify run wrote with --out)")
        if not manifest_path.is_file():
            raise NeuronFileError(f"{directory} is not an SSN Lab identify result (no manifest.json)")
        manifest = read_json(manifest_path, NeuronFileError)
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise NeuronFileError(f"{manifest_path} is not an SSN Lab identify manifest")
        if sites is not None and manifest.get("model_fingerprint") not in (None, sites.fingerprint()):
            raise NeuronFileError(
                f"{directory} was computed on a different model ({manifest.get('model_name')}, fingerprint "
                f"{manifest.get('model_fingerprint')}); the loaded model has fingerprint {sites.fingerprint()}")
        scores_path = directory / "scores.safetensors"
        bundle = bool(manifest.get("bundle")) and not scores_path.is_file()  # a bundle ships without its scores
        scores = None if bundle else ScoreTable.load(scores_path, sites)
        languages = manifest.get("languages", [])
        hr = manifest.get("hr", [])
        ms = {lang: NeuronSet.load(directory / "sets" / f"ms_{lang}.json", sites) for lang in languages}
        ss = {lang: NeuronSet.load(directory / "sets" / f"ss_{lang}.json", sites) for lang in languages
              if lang not in hr}
        ss_all = NeuronSet.load(directory / "sets" / "ss_all.json", sites)
        shared_path = directory / "sets" / "ss_shared_all_nhr.json"
        shared = NeuronSet.load(shared_path, sites) if shared_path.is_file() else NeuronSet()
        try:
            counts = pd.read_csv(directory / "counts.csv")
            overlap = pd.read_csv(directory / "overlap.csv", keep_default_na=False)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise NeuronFileError(f"{directory}: unreadable counts/overlap table ({exc})") from None
        for frame in (counts,):
            frame["language"] = frame["language"].astype(str)
        direction_path = directory / "direction.safetensors"
        direction = RefusalDirection.load(direction_path, sites) if direction_path.is_file() else None
        pairs_path = directory / "pairs.json"
        pairs = load_pairs(pairs_path) if pairs_path.is_file() else None
        activations_path = directory / "activations.safetensors"
        activations = ScoreTable.load(activations_path, sites) if activations_path.is_file() else None
        return cls(scores=scores, ms=ms, ss=ss, ss_all=ss_all, ss_shared_all_nhr=shared, counts=counts,
                   overlap=overlap, manifest=manifest, direction=direction, pairs=pairs, activations=activations)

    @property
    def is_bundle(self) -> bool:
        """A bundled result (`ssn_core.bundle`): sets, counts, direction and a few activation means, no scores."""
        return bool(self.manifest.get("bundle"))

    @property
    def item_ids(self) -> frozenset[str]:
        """The prompt item ids identification used (held-out evaluation must use others)."""
        return frozenset(self.manifest.get("item_ids", ()))
