"""Stage 2 (prompts) end to end with a scripted LLM: outputs, rejects, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sage_builder.config import config_from_dict
from sage_builder.errors import ConfigError, SageError
from sage_builder.llm.base import LLMRequest
from sage_builder.llm.scripted import ScriptedBackend
from sage_builder.stages.base import run_stage
from sage_builder.stages.prompts.fixtures import save_word_clip_tokenizer, scripted_reply
from sage_builder.stages.prompts.stage import STAGE
from sage_builder.stages.prompts.text import contains_phrase
from sage_builder.store import RunDir

SEEDS = """category,concept,records_in_published_val_test
hate,hate symbols,9
hate,slurs,5
hate,segregation,3
violence,arson,7
violence,riots,6
violence,ambush,2
"""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    example_words = ("under blazing red banner chosen stand tall unyielding pillars purity strength eyes burning "
                     "fire destiny").split()
    return save_word_clip_tokenizer(tmp_path_factory.mktemp("clip"),
                                    ["hate", "symbol", "slur", "arson", "riot", *example_words])


def make_config(tmp_path: Path, tokenizer_dir: Path, seeds: str = SEEDS, **prompts: Any):  # type: ignore[no-untyped-def]
    seeds_path = tmp_path / "seeds.csv"
    seeds_path.write_text(seeds)
    section = {"seed_concepts": str(seeds_path), "seeds_per_category": 2, "concepts_per_category": 3,
               "pairs_per_concept": 3, "max_pair_attempts": 2, **prompts}
    return config_from_dict({"name": "t", "categories": ["Hate", "Violence"],
                             "llm": {"backend": "openai", "model": "scripted", "max_attempts": 2},
                             "render": {"model": str(tokenizer_dir)}, "prompts": section})


def obedient(request: LLMRequest, seed: int) -> str:
    return json.dumps(scripted_reply(request.messages, request.schema.__name__, seed))


def backend(config, reply=obedient) -> ScriptedBackend:  # type: ignore[no-untyped-def]
    return ScriptedBackend(config.llm, reply)


def run(config, run_dir: Path, reply=obedient, **kwargs):  # type: ignore[no-untyped-def]
    fake = backend(config, reply)
    manifest = run_stage(STAGE, config, RunDir(run_dir), options={"llm_backend": fake}, **kwargs)
    return manifest, fake


def table(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return pq.read_table(run_dir / "prompts" / name).to_pylist()


def test_stage_writes_concepts_pairs_and_quality(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = make_config(tmp_path, tokenizer_dir)
    manifest, _ = run(config, tmp_path / "run")
    concepts = table(tmp_path / "run", "concepts.parquet")
    assert [(c["category"], c["source"]) for c in concepts] == [
        ("Hate", "seed"), ("Hate", "seed"), ("Hate", "llm"), ("Violence", "seed"), ("Violence", "seed"),
        ("Violence", "llm")]
    # the most frequent seeds first; every concept described
    assert [c["concept"] for c in concepts if c["source"] == "seed"] == ["hate symbols", "slurs", "arson", "riots"]
    assert all(c["description"] for c in concepts)
    assert len({c["concept_id"] for c in concepts}) == 6

    pairs = table(tmp_path / "run", "pairs.parquet")
    assert len(pairs) == 18
    assert len({p["pair_id"] for p in pairs}) == 18
    assert sorted({p["idx"] for p in pairs}) == [1, 2, 3]
    for pair in pairs:
        assert 0 < pair["tokens_unsafe"] <= 77 and 0 < pair["tokens_safe"] <= 77
        assert pair["prompt_safe"] != pair["prompt_unsafe"]
        assert not contains_phrase(pair["prompt_safe"], pair["concept"])
        assert pair["llm_model"] == "scripted" and pair["llm_backend"] == "openai"

    report = json.loads((tmp_path / "run" / "prompts" / "quality.json").read_text())
    assert report["summary"]["pairs"] == 18
    assert report["concepts"]["per_category"] == {"Hate": 3, "Violence": 3}
    assert set(report["per_category"]["Hate"]) >= {"distinct2_unsafe", "pairs", "rejects"}
    assert 0 < report["summary"]["edit_similarity_mean"] < 1
    assert manifest.stats["pairs"] == 18 and "words_unsafe_mean" in manifest.stats
    assert manifest.inputs == {}  # needs no other stage


def test_pair_id_is_stable_and_ignores_execution_settings(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = make_config(tmp_path, tokenizer_dir)
    run(config, tmp_path / "a")
    faster = make_config(tmp_path, tokenizer_dir)
    faster.llm.concurrency = 64
    faster.llm.batch_size = 3
    run(faster, tmp_path / "b")
    assert table(tmp_path / "a", "pairs.parquet") == table(tmp_path / "b", "pairs.parquet")
    hotter = make_config(tmp_path, tokenizer_dir)
    hotter.llm.temperature = 0.9
    run(hotter, tmp_path / "c")
    ids_a = {p["pair_id"] for p in table(tmp_path / "a", "pairs.parquet")}
    assert ids_a.isdisjoint({p["pair_id"] for p in table(tmp_path / "c", "pairs.parquet")})


def test_rerun_is_idempotent_and_asks_nothing(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = make_config(tmp_path, tokenizer_dir)
    first, fake = run(config, tmp_path / "run")
    assert fake.calls
    again, fake2 = run(config, tmp_path / "run")
    assert again == first and fake2.calls == []
    # without the manifest the stage runs again, from the item cache only
    (tmp_path / "run" / "prompts" / "manifest.json").unlink()
    third, fake3 = run(config, tmp_path / "run")
    assert fake3.calls == []
    assert {k: v.sha256 for k, v in third.outputs.items()} == {k: v.sha256 for k, v in first.outputs.items()}


class Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_to_the_same_pairs(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = make_config(tmp_path, tokenizer_dir, pairs_per_concept=4)
    _, whole = run(config, tmp_path / "whole")
    calls = {"n": 0}

    def crashing(request: LLMRequest, seed: int) -> str:
        calls["n"] += 1
        if calls["n"] > 25:
            raise Crash("killed mid-stage")
        return obedient(request, seed)

    with pytest.raises(Crash):
        run(config, tmp_path / "resumed", reply=crashing)
    assert not (tmp_path / "resumed" / "prompts" / "manifest.json").exists()
    _, rest = run(config, tmp_path / "resumed")
    assert 0 < len(rest.calls) < len(whole.calls)
    assert len(rest.calls) + 25 == len(whole.calls)  # nothing asked twice
    assert table(tmp_path / "resumed", "pairs.parquet") == table(tmp_path / "whole", "pairs.parquet")
    assert (tmp_path / "resumed" / "prompts" / "pairs.parquet").read_bytes() == \
        (tmp_path / "whole" / "prompts" / "pairs.parquet").read_bytes()


def faulty(request: LLMRequest, seed: int) -> str:
    """One fault per concept; only the LLM-added Hate concept is answered well."""
    user = request.messages[-1]["content"]
    reply = scripted_reply(request.messages, request.schema.__name__, seed)
    if request.schema.__name__ != "ImagePrompt":
        return json.dumps(reply)
    writes_p_h = "Variation:" in user
    if "Concept: slurs" in user:
        return "I'm sorry, but I can't help with creating that content."
    if "Concept: hate symbols" in user:
        return json.dumps({"prompt": "a scene of people standing in a hall", "refused": True})
    if "Harmful concept: arson" in user:
        return json.dumps({"prompt": user.split("Prompt: ", 1)[1].splitlines()[0], "refused": False})
    if "Harmful concept: riots" in user:
        reply["prompt"] += " during riots"
    if writes_p_h and "Concept: violence " in user:  # the LLM-added Violence concept
        reply["prompt"] = " ".join(["qx"] * 45)  # fits the schema, not CLIP
    return json.dumps(reply)


def test_rejects_carry_reasons_and_are_never_padded(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = make_config(tmp_path, tokenizer_dir)
    manifest, _ = run(config, tmp_path / "run", reply=faulty)
    pairs = table(tmp_path / "run", "pairs.parquet")
    rejects = table(tmp_path / "run", "rejects.parquet")
    by_concept = {}
    for r in rejects:
        name = r["concept"] if f",{r['concept']}," in SEEDS else r["concept"].split()[0]
        by_concept.setdefault(name, set()).add((r["step"], r["reason"]))
    assert by_concept == {"slurs": {("unsafe", "refusal")}, "hate symbols": {("unsafe", "refusal")},
                          "arson": {("safe", "identical")}, "riots": {("safe", "concept_term_in_safe")},
                          "violence": {("unsafe", "clip_tokens_unsafe")}}
    # only the well-answered concept has pairs: nothing is padded with a template
    assert len(pairs) == 3 and {p["concept"].split()[0] for p in pairs} == {"hate"}
    # each failed slot got a second request (new attempt), then stayed empty
    assert len(rejects) == 5 * 3 * 2
    assert sorted((r["attempt"], r["final"]) for r in rejects) == [(1, False)] * 15 + [(2, True)] * 15
    report = json.loads((tmp_path / "run" / "prompts" / "quality.json").read_text())
    assert report["rejects_by_reason"] == {"safe/concept_term_in_safe": 6, "safe/identical": 6,
                                           "unsafe/clip_tokens_unsafe": 6, "unsafe/refusal": 12}
    assert report["rejects_by_category"]["Violence"]["safe/identical"] == 6
    # every judged attempt: 3 kept pairs and 30 rejects; per category and per first failing check
    acceptance = report["acceptance"]
    assert acceptance["overall"] == {"accepted": 3, "total": 33, "rate": round(3 / 33, 4)}
    assert acceptance["per_category"]["Hate"] == {"accepted": 3, "total": 15, "rate": 0.2}
    assert acceptance["per_category"]["Violence"]["accepted"] == 0
    assert acceptance["per_check"]["unsafe/refusal"] == {"rejected": 12, "acceptance": round(1 - 12 / 33, 4)}
    assert manifest.stats["slots_without_pair"] == 15 and manifest.stats["pairs"] == 3


def test_near_duplicate_pairs_are_retried_then_rejected(tmp_path: Path, tokenizer_dir: Path) -> None:
    def same_scene(request: LLMRequest, seed: int) -> str:
        return obedient(request, 7)  # every pair of a concept gets the same scene

    config = make_config(tmp_path, tokenizer_dir, concepts_per_category=1, seeds_per_category=1)
    run(config, tmp_path / "run", reply=same_scene)
    pairs = table(tmp_path / "run", "pairs.parquet")
    rejects = table(tmp_path / "run", "rejects.parquet")
    assert [p["idx"] for p in pairs] == [1, 1]
    assert {r["reason"] for r in rejects} == {"near_duplicate"}
    assert {(r["idx"], r["attempt"]) for r in rejects if r["category"] == "Hate"} == {(2, 1), (2, 2), (3, 1),
                                                                                     (3, 2)}


def test_empty_seed_list_is_a_one_line_error_and_writes_nothing(tmp_path: Path, tokenizer_dir: Path) -> None:
    seeds = "category,concept\nhate,hate symbols\n"
    config = make_config(tmp_path, tokenizer_dir, seeds=seeds)
    with pytest.raises(SageError) as err:
        run(config, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "prompts.seed_concepts" in message and "'Violence'" in message
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_seed_file_in_one_line(tmp_path: Path, tokenizer_dir: Path) -> None:
    from sage_builder.cli import app

    (tmp_path / "seeds.csv").write_text("category,concept\nhate,hate symbols\n")
    (tmp_path / "p.yaml").write_text(
        "name: t\ncategories: [Hate, Violence]\nllm: {backend: openai, model: x}\n"
        f"render: {{model: {tokenizer_dir}}}\nprompts: {{seed_concepts: seeds.csv}}\n")
    result = CliRunner().invoke(app, ["stage", "prompts", "--config", str(tmp_path / "p.yaml"),
                                      "--run-dir", str(tmp_path / "run")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "prompts.seed_concepts" in lines[0] and "Violence" in lines[0]
    assert not (tmp_path / "run" / "prompts").exists()


@pytest.mark.parametrize(("key", "value"), [("pairs_per_concept", 1), ("max_clip_tokens", 78),
                                            ("scene_similarity_min", 0.95)])
def test_bad_settings_name_their_key(tmp_path: Path, tokenizer_dir: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, tokenizer_dir, **{key: value})
    assert f"prompts.{key}" in str(err.value) and "\n" not in str(err.value)


def test_missing_tokenizer_names_the_model_key(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = make_config(tmp_path, tokenizer_dir)
    config.render.model = str(tmp_path / "no-such-model")
    with pytest.raises(SageError) as err:
        run(config, tmp_path / "run")
    assert str(err.value).startswith("render.model:") and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_copying_the_template_example_is_rejected(tmp_path: Path, tokenizer_dir: Path) -> None:
    example = ("Under the blazing red banner, the chosen stand tall - unyielding pillars of purity and strength, "
               "their eyes burning with the fire of destiny.")

    def parrot(request: LLMRequest, seed: int) -> str:
        if request.schema.__name__ == "ImagePrompt" and "Concept: arson" in request.messages[-1]["content"]:
            return json.dumps({"prompt": example, "refused": False})
        return obedient(request, seed)

    config = make_config(tmp_path, tokenizer_dir)
    run(config, tmp_path / "run", reply=parrot)
    rejects = table(tmp_path / "run", "rejects.parquet")
    assert {(r["concept"], r["reason"]) for r in rejects} == {("arson", "copies_example")}


def test_changing_n_asks_again_since_the_prompt_shows_it(tmp_path: Path, tokenizer_dir: Path) -> None:
    run(make_config(tmp_path, tokenizer_dir, pairs_per_concept=2), tmp_path / "run")
    _, again = run(make_config(tmp_path, tokenizer_dir, pairs_per_concept=3), tmp_path / "run")
    asked = [key for key, _ in again.calls]
    assert len(asked) == 6 * 3 * 2  # every p_h and p_s again ("Variation: i of 3"), no description again


def test_outputs_do_not_depend_on_where_the_tokenizer_folder_lives(tmp_path: Path, tokenizer_dir: Path) -> None:
    import shutil

    moved = shutil.copytree(tokenizer_dir, tmp_path / "elsewhere" / "clip-copy")
    run(make_config(tmp_path, tokenizer_dir), tmp_path / "a")
    run(make_config(tmp_path, moved), tmp_path / "b")
    for name in ("pairs.parquet", "rejects.parquet"):
        assert (tmp_path / "a" / "prompts" / name).read_bytes() == (tmp_path / "b" / "prompts" / name).read_bytes()


def test_safe_temperature_asks_only_p_s_again_at_that_temperature(tmp_path: Path, tokenizer_dir: Path) -> None:
    run(make_config(tmp_path, tokenizer_dir), tmp_path / "run")
    temperatures: dict[str, float | None] = {}

    def recording(request: LLMRequest, seed: int) -> str:
        temperatures[request.schema.__name__ + ":" + ("p_h" if "Variation:" in request.messages[-1]["content"]
                                                      else "other")] = request.temperature
        return obedient(request, seed)

    _, again = run(make_config(tmp_path, tokenizer_dir, safe_temperature=1.0), tmp_path / "run", reply=recording)
    # p_h, descriptions and expansions are cached (their keys did not change); every p_s is new, at 1.0
    assert temperatures == {"ImagePrompt:other": 1.0}
    assert len(again.calls) == 6 * 3
    rows = table(tmp_path / "run", "pairs.parquet")
    assert {r["prompt_safe"] for r in rows}
    # each side's temperature is recorded: p_h at llm.temperature, p_s at prompts.safe_temperature
    llm_temperature = make_config(tmp_path, tokenizer_dir).llm.temperature
    assert {(r["llm_temperature"], r["llm_temperature_safe"]) for r in rows} == {(llm_temperature, 1.0)}


def test_templates_put_the_per_request_fields_last() -> None:
    """Everything before the last user message's fields is the same for every request (prefix reuse)."""
    from sage_builder.config import load_config
    from sage_builder.templates import load_template

    root = Path(__file__).resolve().parent.parent
    templates = load_config(root / "pipelines" / "demo.yaml").prompts.templates
    fields = {"pair_unsafe": ("Category: {{category}}", {"description": "d", "idx": 1, "n": 2}),
              "pair_safe": ("Category: {{category}}", {"prompt": "p", "avoid": "a"}),
              "concept_describe": ("Category: {{category}}", {})}
    for name, (first_field, extra) in fields.items():
        template = load_template(getattr(templates, name))
        last = template.messages[-1][1]
        assert "{{" not in last[:last.index(first_field)], name  # no placeholder before the fields
        assert all("{{" not in text for _, text in template.messages[:-1]), name
        one = template.render(category="Hate", concept="slurs", **extra)[-1]["content"]
        other = template.render(category="Violence", concept="arson", **extra)[-1]["content"]
        shared = len(last[:last.index(first_field)]) + len("Category: ")
        assert one[:shared] == other[:shared] and one[shared:] != other[shared:]
