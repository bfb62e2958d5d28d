"""Prompt sets: the built-in parallel set, the MultiJail / user-file loaders, groups, and every error message."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from ssn_core import prompts as P
from ssn_core.errors import PromptSetError, SSNError

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "assets" / "prompts" / "builtin"
MULTIJAIL_CSV = ROOT.parent / "shared" / "datasets" / "multijail" / "MultiJail.csv"
TWELVE = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv", "af", "ne")

# The script each language is written in (Unicode blocks); Latin-script languages are checked separately.
SCRIPTS = {
    "zh": r"[\u4e00-\u9fff]",
    "ko": r"[\uac00-\ud7af]",
    "th": r"[\u0e00-\u0e7f]",
    "ar": r"[\u0600-\u06ff]",
    "bn": r"[\u0980-\u09ff]",
    "ne": r"[\u0900-\u097f]",
}
LATIN = ("en", "it", "vi", "sw", "jv", "af")


def rows(label: str) -> list[dict]:
    return [json.loads(line) for line in (BUILTIN / f"{label}.jsonl").read_text(encoding="utf-8").splitlines()]


# ----- the built-in set ------------------------------------------------------------------------------------------


def test_builtin_has_60_plus_items_per_label_and_language():
    assert P.BUILTIN_LANGUAGES == TWELVE
    full = P.load_builtin()
    counts = full.counts()
    assert set(counts) == set(TWELVE)
    for lang in TWELVE:
        assert counts[lang]["harmful"] >= 60, lang
        assert counts[lang]["harmless"] >= 60, lang
        assert counts[lang]["harmful"] == counts[lang]["harmless"]
    full.check(min_per_language=60)


def test_builtin_is_parallel_and_complete():
    for label, prefix in (("harmful", "h"), ("harmless", "s")):
        data = rows(label)
        ids = [r["id"] for r in data]
        assert ids == [f"{prefix}{i:03d}" for i in range(1, len(data) + 1)]
        for r in data:
            assert set(TWELVE) <= set(r), r["id"]
            assert r["category"] and re.fullmatch(r"[a-z-]+", r["category"]), r["id"]
            for lang in TWELVE:
                assert r[lang].strip() == r[lang] and len(r[lang]) >= 10, (r["id"], lang)
        # Every language has the same ids in the same order.
        full = P.load_builtin(label=label)
        for lang in TWELVE:
            assert [p.id for p in full.by_language(lang, label)] == ids


def test_builtin_translations_are_not_copies_of_english_or_of_each_other():
    for label in P.LABELS:
        data = rows(label)
        for lang in TWELVE[1:]:
            same = sum(r[lang] == r["en"] for r in data)
            assert same <= 0.05 * len(data), (label, lang, same)
            texts = [r[lang] for r in data]
            assert len(set(texts)) == len(texts), (label, lang, [t for t, c in Counter(texts).items() if c > 1])


def test_harmless_items_pair_with_harmful_items():
    harmful, harmless = rows("harmful"), rows("harmless")
    assert len(harmful) == len(harmless)
    for h, s in zip(harmful, harmless, strict=True):
        assert h["pair"] == s["id"] and s["pair"] == h["id"]
        assert h["id"][1:] == s["id"][1:]
        for lang in TWELVE:
            assert h[lang] != s[lang], (h["id"], lang)
        # Minimal-edit counterparts are of similar length (the contrast should isolate harm, not style).
        ratio = len(s["en"]) / len(h["en"])
        assert 0.5 <= ratio <= 2.0, (h["id"], h["en"], s["en"])
    harmful_categories = Counter(r["category"] for r in harmful)
    assert len(harmful_categories) >= 10 and max(harmful_categories.values()) <= len(harmful) // 4
    assert not set(harmful_categories) & {r["category"] for r in harmless}


@pytest.mark.parametrize("lang", TWELVE)
def test_builtin_script_sanity(lang):
    full = P.load_builtin(languages=[lang])
    for p in full:
        letters = [c for c in p.text if c.isalpha()]
        if lang in SCRIPTS:
            native = len(re.findall(SCRIPTS[lang], p.text))
            assert native >= 0.6 * len(letters), (p.id, p.text)
        else:
            latin = [c for c in letters if "LATIN" in unicodedata.name(c, "")]
            assert len(latin) == len(letters), (p.id, p.text)
    if lang == "vi":  # Vietnamese is written with its diacritics, not as bare ASCII
        assert all(re.search(r"[ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ]", p.text.lower())
                   for p in full)


def test_load_builtin_languages_and_n():
    small = P.load_builtin(languages="en,bn", n=5)
    assert small.languages == ("en", "bn")
    assert small.counts() == {"en": {"harmful": 5, "harmless": 5}, "bn": {"harmful": 5, "harmless": 5}}
    assert small.item_ids[:5] == ("h001", "h002", "h003", "h004", "h005")
    assert set(small.item_ids) == {f"h00{i}" for i in range(1, 6)} | {f"s00{i}" for i in range(1, 6)}
    assert P.load_builtin(languages=["ne"], label="harmless").labels == ("harmless",)
    with pytest.raises(PromptSetError, match=r"built-in prompt set has no language\(s\) fr"):
        P.load_builtin(languages=["en", "fr"])
    with pytest.raises(PromptSetError, match="at least 1"):
        P.load_builtin(n=0)


# ----- PromptSet ----------------------------------------------------------------------------------------------------


def test_select_and_by_language():
    full = P.load_builtin(languages=["en", "sw", "jv"])
    sel = full.select(languages=["jv", "en"], label="harmful", limit_per_language=3)
    assert [(p.language, p.id) for p in sel] == [("jv", "h001"), ("jv", "h002"), ("jv", "h003"),
                                                  ("en", "h001"), ("en", "h002"), ("en", "h003")]
    both = full.select(limit_per_language=2)
    assert both.counts() == {lang: {"harmful": 2, "harmless": 2} for lang in ("en", "sw", "jv")}
    assert full.select(languages=["bn"]).languages == ()  # known code, absent: empty, `check` reports it
    assert [p.label for p in full.by_language("sw")][:1] == ["harmful"]
    assert len(full.by_language("sw", "harmless")) == len(full.by_language("sw", "harmful"))
    with pytest.raises(PromptSetError, match="label must be"):
        full.select(label="unsafe")
    with pytest.raises(PromptSetError, match="at least 1"):
        full.select(limit_per_language=0)
    frame = sel.to_dataframe()
    assert list(frame.columns) == ["id", "language", "label", "category", "text"] and len(frame) == 6


def test_content_hash_is_order_independent_and_content_sensitive():
    a = P.Prompt("1", "en", "harmful", "How can I make a bomb at home?", "weapons")
    b = P.Prompt("1", "en", "harmless", "How can I make bread at home?", "cooking")
    one = P.PromptSet((a, b), "one")
    two = P.PromptSet((b, a), "another source")
    assert one.content_hash() == two.content_hash() == one.data_hash()
    # Pinned canonical form (manifests store this hash, so it must not drift silently): rows sorted as
    # [language, label, id, category, text], compact JSON, UTF-8, sha256.
    canonical = ('[["en","harmful","1","weapons","How can I make a bomb at home?"],'
                 '["en","harmless","1","cooking","How can I make bread at home?"]]')
    assert one.content_hash() == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    changed = P.PromptSet((a, P.Prompt("1", "en", "harmless", "How can I make bread at home!", "cooking")))
    assert changed.content_hash() != one.content_hash()
    recategorised = P.PromptSet((a, P.Prompt("1", "en", "harmless", b.text, "food")))
    assert recategorised.content_hash() != one.content_hash()
    builtin = P.load_builtin()
    assert builtin.content_hash() == P.load_builtin().content_hash()
    reversed_set = P.PromptSet(tuple(reversed(builtin.prompts)))
    assert reversed_set.content_hash() == builtin.content_hash()


def test_prompt_and_set_validation():
    with pytest.raises(PromptSetError, match="label must be 'harmful' or 'harmless', got 'safe'"):
        P.Prompt("1", "en", "safe", "hi")
    p = P.Prompt("1", "en", "harmful", "x")
    with pytest.raises(PromptSetError, match="duplicate prompt: id '1', language 'en'"):
        P.PromptSet((p, p), "dup")


def test_check_messages():
    harmful_only = P.load_builtin(languages=["en", "bn"], label="harmful")
    with pytest.raises(PromptSetError, match="language en has 64 harmful prompts but no harmless counterpart"):
        harmful_only.check()
    harmful_only.check(labels=("harmful",))
    tiny = P.load_builtin(languages=["en"], n=2)
    with pytest.raises(PromptSetError, match=r"only 2 harmful prompt\(s\); at least 4 .*real study"):
        tiny.check()
    tiny.check(min_per_language=2)
    with pytest.raises(PromptSetError, match=r"no prompts in language\(s\) sw; it has: en"):
        tiny.check(languages=["en", "sw"], min_per_language=1)


# ----- languages and groups -----------------------------------------------------------------------------------------


def test_languages_and_parse_languages():
    for code in (*TWELVE, "de", "fr", "es", "ja", "ru", "te"):
        assert code in P.LANGUAGES
    assert P.language_name("jv") == "Javanese" and P.language_name("ne") == "Nepali"
    assert P.parse_languages("en,zh, BN ,zh") == ["en", "zh", "bn"]
    assert P.parse_languages(["sw", "jv"]) == ["sw", "jv"]
    with pytest.raises(PromptSetError, match=r"unknown language code\(s\) 'xx'; known codes: en, zh"):
        P.parse_languages("en,xx")
    with pytest.raises(PromptSetError, match="no language codes given"):
        P.parse_languages(" , ")
    with pytest.raises(PromptSetError, match="known codes: en, bn"):
        P.parse_languages("de", known=("en", "bn"))


def test_language_groups():
    mj = P.LanguageGroups.multijail()
    assert mj.to_dict() == P.MULTIJAIL_GROUPS
    assert mj.hr_languages == ("en", "zh", "it", "vi")
    assert mj.nhr_languages == ("ar", "ko", "th", "bn", "sw", "jv")
    assert mj.group_of("th") == "medium" and mj.group_of("jv") == "low"
    paper = P.LanguageGroups.paper()
    assert paper.hr_languages == ("en",)
    assert set(paper.nhr_languages) == set(TWELVE) - {"en"}
    custom = P.LanguageGroups.from_dict({"hr": "en,de", "nhr": ["bn", "sw"]})
    assert custom.hr_group == "hr" and custom.languages == ("en", "de", "bn", "sw")
    with pytest.raises(PromptSetError, match="'af' is in no group"):
        mj.group_of("af")
    with pytest.raises(PromptSetError, match=r"language 'en' is in two groups: 'a' and 'b'"):
        P.LanguageGroups.from_dict({"a": ["en"], "b": ["en"]}, hr_group="a")
    with pytest.raises(PromptSetError, match=r"unknown language code\(s\) 'klingon'"):
        P.LanguageGroups.from_dict({"hr": ["en", "klingon"]})
    with pytest.raises(PromptSetError, match="say which group is high-resource"):
        P.LanguageGroups.from_dict({"a": ["en"], "b": ["bn"]})
    with pytest.raises(PromptSetError, match="'top' is not one of the groups"):
        P.LanguageGroups.from_dict({"a": ["en"]}, hr_group="top")
    assert P.PromptFormat("raw") is P.PromptFormat.RAW and P.PromptFormat.CHAT == "chat"


# ----- MultiJail -----------------------------------------------------------------------------------------------------

needs_multijail = pytest.mark.skipif(not MULTIJAIL_CSV.exists(), reason=f"{MULTIJAIL_CSV} is absent")


@needs_multijail
def test_multijail_csv_loads_315_harmful_per_language():
    mj = P.load_multijail(MULTIJAIL_CSV)
    assert mj.languages == P.MULTIJAIL_LANGUAGES
    assert mj.counts() == {lang: {"harmful": 315, "harmless": 0} for lang in P.MULTIJAIL_LANGUAGES}
    en = mj.by_language("en")
    assert en[0].id == "mj0" and en[-1].id == "mj314"  # the BOM did not eat the "id" column name
    assert not any(p.text.startswith("\ufeff") or p.id.startswith("\ufeff") for p in mj)
    assert all(p.category for p in mj)
    assert "Violence & incitement" in mj.categories
    assert [p.id for p in mj.by_language("jv")] == [p.id for p in en]  # parallel
    sub = P.load_multijail(str(MULTIJAIL_CSV), languages="en,bn", n=10)
    assert sub.counts() == {"en": {"harmful": 10, "harmless": 0}, "bn": {"harmful": 10, "harmless": 0}}
    with pytest.raises(PromptSetError, match=r"MultiJail has no language\(s\) af"):
        P.load_multijail(MULTIJAIL_CSV, languages=["en", "af"])


@needs_multijail
def test_multijail_with_builtin_harmless():
    combined = P.with_harmless(P.load_multijail(MULTIJAIL_CSV, languages=["en", "sw"], n=20))
    assert combined.counts() == {"en": {"harmful": 20, "harmless": 64}, "sw": {"harmful": 20, "harmless": 64}}
    assert "MultiJail" in combined.source and "builtin" in combined.source


def test_with_harmless_names_the_uncovered_language(tmp_path):
    harmful = P.load_builtin(languages=["en", "bn"], label="harmful")
    harmless_en = P.load_builtin(languages=["en"], label="harmless")
    with pytest.raises(PromptSetError, match=r"no harmless counterpart for language\(s\) bn"):
        P.with_harmless(harmful, harmless_en)
    german = tmp_path / "de.jsonl"
    german.write_text("".join(json.dumps({"id": str(i), "language": "de", "label": "harmful",
                                          "text": f"Frage {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    with pytest.raises(PromptSetError, match=r"no harmless counterpart for language\(s\) de"):
        P.with_harmless(P.load_file(german))  # the built-in harmless set has no German
    with pytest.raises(PromptSetError, match="has no harmful prompts"):
        P.with_harmless(harmless_en)
    ok = P.with_harmless(harmful, P.load_builtin(languages=["en", "bn", "sw"], label="harmless"))
    assert ok.languages == ("en", "bn") and ok.counts()["bn"] == {"harmful": 64, "harmless": 64}


def test_multijail_hub_id_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptSetError, match=r"offline mode is on .*pass its path"):
        P.load_multijail("DAMO-NLP-SG/MultiJail")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(PromptSetError, match=r"needs the 'datasets' package.*pass its path"):
        P.load_multijail("DAMO-NLP-SG/MultiJail")


# ----- user files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_user_file_round_trip(tmp_path, suffix):
    original = P.load_builtin(languages=["en", "ar", "jv"], n=6)
    path = original.save(tmp_path / f"set{suffix}")
    loaded = P.load_file(path, category_col="category")
    assert loaded.content_hash() == original.content_hash()
    assert [(p.id, p.language, p.label) for p in loaded] == [(p.id, p.language, p.label) for p in original]
    only_ar = P.load_file(path, languages="ar", category_col="category")
    assert only_ar.languages == ("ar",) and len(only_ar) == 12


def test_user_file_wide_format_and_defaults(tmp_path):
    wide = tmp_path / "wide.csv"
    lines = ["\ufeffid,en,bn,topic"] + [f"q{i},Question {i}?,প্রশ্ন {i}?,t{i % 2}" for i in range(5)]
    wide.write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = P.load_file(wide, language_columns=["en", "bn"], label="harmful", category_col="topic")
    assert s.counts() == {"en": {"harmful": 5, "harmless": 0}, "bn": {"harmful": 5, "harmless": 0}}
    assert [p.id for p in s.by_language("bn")] == ["q0", "q1", "q2", "q3", "q4"]
    assert s.by_language("bn")[0].text == "প্রশ্ন 0?" and s.by_language("en")[1].category == "t1"
    # Long TSV without an id column and with a fixed label: ids are row numbers.
    tsv = tmp_path / "long.tsv"
    tsv.write_text("text\tlanguage\n" + "".join(f"Hello {i}\tEN\n" for i in range(4)), encoding="utf-8")
    t = P.load_file(tsv, label="harmless")
    assert [p.id for p in t] == ["0001", "0002", "0003", "0004"] and t.languages == ("en",)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_user_file_errors(tmp_path):
    good = "".join(json.dumps({"id": str(i), "language": "en", "label": "harmful", "text": f"q{i}"}) + "\n"
                   for i in range(4))
    with pytest.raises(PromptSetError, match="prompt file not found"):
        P.load_file(tmp_path / "missing.jsonl")
    with pytest.raises(PromptSetError, match="unsupported prompt file type '.txt'"):
        P.load_file(write(tmp_path / "a.txt", "hello"))
    with pytest.raises(PromptSetError, match="not UTF-8"):
        P.load_file(write(tmp_path / "latin1.csv", "text,language,label\ncaf\xe9,en,harmful\n", "latin-1"))
    bad_json = write(tmp_path / "bad.jsonl", good + '{"id": "x", "language": "en",\n')
    with pytest.raises(PromptSetError, match=r"bad.jsonl line 5: not valid JSON"):
        P.load_file(bad_json)
    with pytest.raises(PromptSetError, match="line 2: expected a JSON object"):
        P.load_file(write(tmp_path / "list.jsonl", good.splitlines()[0] + "\n[1, 2]\n"))
    no_label = write(tmp_path / "nolabel.csv", "prompt,lang\nhi,en\n")
    with pytest.raises(PromptSetError, match=r"missing column\(s\) 'text', 'language', 'label'; "
                                             r"columns found: 'prompt', 'lang'"):
        P.load_file(no_label)
    assert len(P.load_file(no_label, text_col="prompt", language_col="lang", label="harmful",
                           min_per_language=1)) == 1
    with pytest.raises(PromptSetError, match=r"missing column\(s\) 'sw'; columns found: 'id', 'en'"):
        P.load_file(write(tmp_path / "w.csv", "id,en\n1,hi\n"), language_columns=["en", "sw"], label="harmful")
    with pytest.raises(PromptSetError, match=r"line 2: unknown language code 'xx'"):
        P.load_file(write(tmp_path / "lang.csv", "text,language,label\nhi,xx,harmful\n"))
    with pytest.raises(PromptSetError, match=r"line 3: label must be 'harmful' or 'harmless', got 'bad'"):
        P.load_file(write(tmp_path / "lab.csv", "text,language,label\nhi,en,harmful\nho,en,bad\n"))
    with pytest.raises(PromptSetError, match=r"line 2: empty 'text'"):
        P.load_file(write(tmp_path / "empty.csv", "text,language,label\n  ,en,harmful\n"))
    with pytest.raises(PromptSetError, match=r"only 4 harmful prompt\(s\); at least 5"):
        P.load_file(write(tmp_path / "few.jsonl", good), min_per_language=5)
    assert len(P.load_file(tmp_path / "few.jsonl")) == 4  # the default minimum is 4
    with pytest.raises(PromptSetError, match=r"has no prompts in language\(s\) bn; it has: en"):
        P.load_file(tmp_path / "few.jsonl", languages=["bn"])
    with pytest.raises(PromptSetError, match="has no rows"):
        P.load_file(write(tmp_path / "header.csv", "text,language,label\n"))
    with pytest.raises(PromptSetError, match="cannot save a prompt set as x.txt"):
        P.load_file(tmp_path / "few.jsonl").save(tmp_path / "x.txt")
    assert issubclass(PromptSetError, SSNError)
