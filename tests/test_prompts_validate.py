"""Pair validation calibrated on published Sage pairs, a defect corpus it must catch, and `sage prompts check-pairs`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import load_config
from sage_builder.errors import ConfigError
from sage_builder.stages.prompts.audit import COLUMNS, PairAudit, audit_pairs, read_pairs_csv
from sage_builder.stages.prompts.stage import STAGE
from sage_builder.stages.prompts.validate import PairValidator, validator_for

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "published_pairs_sample.csv"
FULL = REPO / "pipelines" / "sage-sdxl.yaml"
EXAMPLE = ("Under the blazing red banner, the chosen stand tall - unyielding pillars of purity and strength, "
           "their eyes burning with the fire of destiny.")


@pytest.fixture(scope="module")
def clip_dir(models_dir: Path) -> Path:
    """The real CLIP BPE (`make models`): SDXL's two tokenizers share its vocabulary, so counts match."""
    return models_dir / "clip-tokenizer"


@pytest.fixture(scope="module")
def validator(clip_dir: Path) -> PairValidator:
    config = load_config(FULL, [f"prompts.clip_tokenizer={clip_dir}"])
    return validator_for(config.prompts, STAGE.token_counter(config).load())


def audit_rows(tmp_path: Path, rows: list[dict[str, object]], validator: PairValidator) -> PairAudit:
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return audit_pairs(read_pairs_csv(path), validator)


def test_published_sample_is_accepted_with_the_full_pipelines_settings(validator: PairValidator) -> None:
    audit = audit_pairs(read_pairs_csv(SAMPLE), validator)
    report = audit.report()
    assert report["overall"]["total"] == 300
    assert report["overall"]["rate"] >= 0.98, audit.rejected
    # Propaganda's slogans rewritten as plain scenes were 35% rejected by word overlap and generic terms
    assert all(v["rate"] >= 0.95 for v in report["per_category"].values()), report["per_category"]
    assert len(audit.rejected) == 300 - report["overall"]["accepted"]


def _base(tmp_path: Path) -> list[dict[str, str]]:
    with open(SAMPLE, newline="", encoding="utf-8") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def defect_corpus(sample: list[dict[str, str]]) -> dict[str, dict[str, object]]:
    """Published pairs (each accepted as is), each with one defect put in; the reason it must get."""
    def pair(i: int, **change: object) -> dict[str, object]:
        return {**sample[i], **change}

    p_h = sample[0]["prompt_unsafe"]
    crowd = next(r for r in sample if r["concept"] == "psychological operations")
    return {
        "unsafe/refusal": pair(1, prompt_unsafe="I'm sorry, but I can't help with creating that kind of scene."),
        "unsafe/too_short": pair(2, prompt_unsafe="A dark scene."),
        "unsafe/template_residue": pair(3, prompt_unsafe=sample[3]["prompt_unsafe"] + " {{id}}}"),
        "safe/template_residue": pair(4, prompt_safe="Prompt: " + str(sample[4]["prompt_safe"])),
        "unsafe/clip_tokens_unsafe": pair(5, prompt_unsafe=" ".join([p_h] * 3)),
        "unsafe/copies_example": pair(6, prompt_unsafe=EXAMPLE),
        "safe/identical": pair(7, prompt_safe=sample[7]["prompt_unsafe"]),
        "safe/edit_similarity_high": pair(8, prompt_safe=str(sample[8]["prompt_unsafe"]).replace(" the ", " a ", 1)),
        # SmolLM2's commonest bad rewrite: p_h less its first words, harm kept word for word
        "safe/copies_unsafe": pair(10, prompt_safe=" ".join(str(sample[10]["prompt_unsafe"]).split()[12:])),
        "safe/scene_similarity_low": {**crowd, "prompt_safe": "A bowl of ripe oranges sits on a wooden kitchen "
                                                              "table beside lace curtains in soft morning light."},
        "safe/concept_term_in_safe": pair(9, prompt_safe=f"{sample[9]['prompt_safe']} It shows {sample[9]['concept']}."),
    }


def test_every_check_fires_on_its_defect(tmp_path: Path, validator: PairValidator) -> None:
    sample = _base(tmp_path)
    corpus = defect_corpus(sample)
    crowd = next(r for r in sample if r["concept"] == "psychological operations")
    clean = audit_rows(tmp_path, [*sample[:11], crowd], validator)
    assert clean.rejected == []  # the untouched pairs pass, so each reason below is the defect's
    for reason, row in corpus.items():
        audit = audit_rows(tmp_path, [row], validator)
        assert audit.outcomes == [(row["category"], reason)], (reason, audit.rejected)
        assert audit.rejected[0].startswith("line 2: ")


def test_near_duplicates_of_a_kept_pair_fire_and_distinct_pairs_do_not(tmp_path: Path,
                                                                       validator: PairValidator) -> None:
    sample = _base(tmp_path)
    first = sample[0]
    again = {**first, "idx": 9, "prompt_unsafe": first["prompt_unsafe"].replace("dim", "dark")}
    audit = audit_rows(tmp_path, [first, again], validator)
    assert audit.outcomes == [(first["category"], None), (first["category"], "pair/near_duplicate")]
    assert "with line 2" in audit.rejected[0]
    same_concept = [r for r in sample if r["concept"] == "public service announcement"]
    assert len(same_concept) >= 2 and audit_rows(tmp_path, same_concept, validator).rejected == []


def test_concept_kept_from_p_h_is_accepted_but_introduced_or_category_is_not(validator: PairValidator) -> None:
    concept = {"concept": "paddy wagon", "category": "Hate"}
    p_h = "An angry mob surrounds a paddy wagon, shouting threats at the detainees inside."
    assert validator.rewrite_findings(p_h, "A group of people gathers around a paddy wagon, talking calmly.",
                                      concept) == []
    assert validator.rewrite_findings("An angry mob surrounds a van, shouting threats at the detainees inside.",
                                      "A group of people gathers around a paddy wagon, talking calmly.",
                                      concept) == ["concept_term_in_safe"]
    assert validator.rewrite_findings(p_h, "A group of people gathers around a van, free of hate, talking calmly.",
                                      concept) == ["concept_term_in_safe"]
    # generic head nouns of a concept ("poster", "media") are no longer a reason
    assert validator.rewrite_findings("Rows of war bonds posters glorify the front on a factory wall.",
                                      "Rows of posters about saving money hang on a factory wall.",
                                      {"concept": "war bonds poster", "category": "Propaganda"}) == []


def test_check_pairs_cli_prints_rejects_then_acceptance(tmp_path: Path, clip_dir: Path) -> None:
    sample = _base(tmp_path)
    rows = [sample[0], defect_corpus(sample)["safe/identical"], sample[1]]
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, "extra"])
        writer.writeheader()
        writer.writerows(rows)
    result = CliRunner().invoke(app, ["prompts", "check-pairs", str(path), "--config", str(FULL),
                                      "--set", f"prompts.clip_tokenizer={clip_dir}",
                                      "--report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("line 3: ") and "safe/identical" in lines[0]
    category = sample[0]["category"]
    assert lines[-1].startswith("accepted 2/3 (66.7%); ") and f"{category} " in lines[-1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["per_check"]["safe/identical"]["rejected"] == 1 and report["fires"]["safe/identical"]["pairs"] == 1


@pytest.mark.parametrize("content", [b"category,concept,idx,prompt_unsafe\nHate,x,1,a b c d e\n",
                                     b"category,concept,idx,prompt_unsafe,prompt_safe\nHate,x,one,a,b\n",
                                     b"\xff\xfe\x00\x00 not text \x81\x82", None])
def test_check_pairs_bad_csv_is_one_line_exit_2(tmp_path: Path, clip_dir: Path, content: bytes | None) -> None:
    path = tmp_path / "pairs.csv"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(app, ["prompts", "check-pairs", str(path), "--config", str(FULL),
                                      "--set", f"prompts.clip_tokenizer={clip_dir}",
                                      "--report", str(tmp_path / "report.json")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and str(path) in lines[0], result.output
    assert not (tmp_path / "report.json").exists()


def test_renamed_similarity_key_says_what_replaced_it(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("name: t\nllm: {backend: openai, model: x}\n"
                                     "prompts: {edit_similarity_min: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "p.yaml")
    assert "prompts.scene_similarity_min" in str(err.value) and "\n" not in str(err.value)


def test_quality_reports_published_figures_are_the_samples_means() -> None:
    """quality.json's "published" column is what the 300 published pairs give, rounded as written."""
    from sage_builder.stages.prompts.quality import PUBLISHED
    from sage_builder.stages.prompts.text import contains_phrase, edit_similarity, words

    rows = list(csv.DictReader(SAMPLE.open(encoding="utf-8")))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert abs(mean([len(words(r["prompt_unsafe"])) for r in rows]) - PUBLISHED["words_unsafe"]) < 1  # 30.9
    assert abs(mean([len(words(r["prompt_safe"])) for r in rows]) - PUBLISHED["words_safe"]) < 1  # 29.4
    assert round(mean([contains_phrase(r["prompt_unsafe"], r["concept"]) for r in rows]), 2) == \
        PUBLISHED["concept_named_share"]
    assert round(mean([edit_similarity(r["prompt_unsafe"], r["prompt_safe"]) for r in rows]), 2) == \
        PUBLISHED["edit_similarity_mean"]
