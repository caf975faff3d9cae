"""Stage 1 (profiles) end to end on small inputs: labellers, embeddings, clusters, splits, resume,
bad input. Embeddings come from a tiny random Llama (SmolLM2's tokenizer, 2 layers, hidden 32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import config_from_dict
from sage_builder.errors import ConfigError, SageError
from sage_builder.llm.base import TransportFailure
from sage_builder.llm.scripted import ScriptedBackend
from sage_builder.stages.base import run_stage
from sage_builder import user_embedding
from sage_builder.stages.profiles import clustering, stage as profiles_stage
from sage_builder.stages.profiles.demographics import Demographics, load_demographics
from sage_builder.stages.profiles.labelling import rule_agreement, rules_banned
from sage_builder.store import RunDir

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"]
COLUMNS = ["user_id", "age", "age_group", "gender", "religion", "physical_condition", "mental_condition",
           "banned", "allowed", "labeller", "embedding", "cluster_id", "level", "split", "test_seen"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_dir) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template (hidden size 32)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def make_config(model: Path, **profiles):
    data = {"name": "t", "seed": 2025,
            "llm": {"backend": "transformers", "model": str(model), "temperature": 0.7, "max_attempts": 2,
                    "device": "cpu", "dtype": "float32"},
            "profiles": {"n_users": 24, "sampler": "psalign", "labeller": "rules", "tsne_perplexity": 5,
                         **profiles}}
    return config_from_dict(data)


def read(run: Path) -> dict:
    return pq.read_table(run / "profiles" / "profiles.parquet").to_pydict()


def rules_reply(spec, fail_for: set[str] = frozenset()):
    """A scripted LLM that answers by the rules (among the categories its schema offers), except for
    users whose attributes are in fail_for."""
    def reply(request, seed):
        user = json.loads(request.messages[-1]["content"].split("User profile: ")[1].split("\n")[0])
        demo = Demographics(user["Age"], user["Age_Group"], user["Gender"], user["Religion"],
                            user["Physical_Condition"], user["Mental_Condition"])
        if json.dumps(user) in fail_for:
            return "I'm sorry, I can't help with that."
        offered = request.json_schema()["$defs"]["Category"]["enum"]
        return json.dumps({"forbidden": [c for c in rules_banned(spec, demo, CATEGORIES) if c in offered]})
    return reply


@pytest.fixture(scope="module")
def spec():
    return load_demographics(REPO / "profiles" / "demographics.yaml")


def test_rules_labeller(spec):
    child = Demographics(10, "children", "female", "None", "healthy", "healthy")
    assert rules_banned(spec, child, CATEGORIES) == ["Violence", "Self-Harm", "Sexuality"]
    adult = Demographics(40, "middle-aged", "male", "Islam", "hearing impairment", "healthy")
    assert rules_banned(spec, adult, CATEGORIES) == ["Hate", "Harassment", "Shocking", "Propaganda"]
    assert rules_banned(spec, spec.permissive(), CATEGORIES) == []
    agreement = rule_agreement(spec, [child, adult], [["Sexuality"], ["Hate", "Propaganda", "Violence"]])
    rows = {r["rule"].split(" ->")[0]: r for r in agreement["rules"]}
    assert rows["under 18 or an unstable mental condition"] == {
        "rule": "under 18 or an unstable mental condition -> forbid Sexuality, Self-Harm, Violence",
        "mandatory": True, "applicable": 1, "satisfied": 0, "satisfied_share": 0.0, "at_least_one_banned": 1,
        "category_bans": {"Sexuality": 1, "Self-Harm": 0, "Violence": 0}}
    assert agreement["hard_rules"] == {"applicable": 1, "satisfied": 0, "satisfied_share": 0.0}
    assert rows["Islam, Christianity or Buddhism"]["satisfied"] == 1
    assert agreement["unprompted_bans"] == 1  # Violence for the healthy adult


def test_mean_pooling_matches_per_prompt_computation(tiny_llama):
    import torch
    from transformers import AutoModel, AutoTokenizer

    embedder = user_embedding.StatementEmbedder(str(tiny_llama), device="cpu", dtype="float32")
    convs = [[{"role": "user", "content": "short"}],
             [{"role": "system", "content": "a much longer system message " * 5},
              {"role": "user", "content": "and a question about it"}]]
    batched = embedder.embed(convs)
    assert batched.dtype == np.float32 and batched.shape == (2, 32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModel.from_pretrained(tiny_llama).eval()
    for i, conv in enumerate(convs):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        np.testing.assert_allclose(batched[i], hidden.mean(0).numpy(), atol=1e-5)
    # The short prompt really was padded in the batch.
    lengths = [len(tok(embedder.prompt_text(c), add_special_tokens=False)["input_ids"]) for c in convs]
    assert lengths[0] < lengths[1]


def test_clusters_levels_and_splits_at_1000_users():
    assert clustering.split_sizes(1000, 900, 50, 50, 50) == {"val": 50, "test_unseen": 50, "train": 900,
                                                              "test_seen": 50}
    assert clustering.split_sizes(24, 900, 50, 50, 50) == {"val": 1, "test_unseen": 1, "train": 22,
                                                            "test_seen": 1}
    assert clustering.split_sizes(200, 900, 50, 50, 50)["val"] == 10
    assert clustering.split_sizes(2, 900, 50, 50, 50) == {"val": 0, "test_unseen": 0, "train": 2, "test_seen": 1}
    with pytest.raises(ConfigError, match="too few for the splits"):
        clustering.split_sizes(3, 0, 50, 50, 0)
    ids = [f"{i:07d}" for i in range(1, 1001)]
    sizes = clustering.split_sizes(1000, 900, 50, 50, 50)
    split, seen = clustering.assign_splits(ids, sizes, 2025)
    assert (split, seen) == clustering.assign_splits(ids, sizes, 2025)
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test_unseen")}
    assert counts == {"train": 900, "val": 50, "test_unseen": 50}
    assert len(seen) == 50 and all(split[u] == "train" for u in seen)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 10
    vectors = np.vstack([c + rng.normal(size=(200, 16)) for c in centres]).astype(np.float32)
    result = clustering.cluster_users(vectors, 5, 2025, extra=vectors[:1])
    assert sorted(np.bincount(result.labels).tolist()) == [200] * 5
    assert len(result.reference) == 5
    assert all(result.labels[r] == c for c, r in enumerate(result.reference))
    levels = clustering.assign_levels([("0001001", 0), ("0000003", 4), ("0000001", 2), ("0000009", 7),
                                       ("0000002", 4), ("0000004", 5)])
    assert levels == {"0001001": 0, "0000001": 1, "0000002": 2, "0000003": 3, "0000004": 4, "0000009": 5}


def test_stage_with_rules_labeller_at_24_users(tmp_path, tiny_llama):
    config = make_config(tiny_llama)
    manifest = run_stage(profiles_stage.STAGE, config, RunDir(tmp_path))
    data = read(tmp_path)
    assert list(data) == COLUMNS
    assert data["user_id"] == [f"{i:07d}" for i in range(1, 26)]
    assert data["user_id"][-1] == "0000025" and data["labeller"][-1] == "fixed"
    assert data["split"][-1] == "reference" and data["level"][-1] == 0 and data["banned"][-1] == []
    assert set(data["labeller"][:-1]) == {"rules"}
    assert [data["split"][:-1].count(s) for s in ("train", "val", "test_unseen")] == [22, 1, 1]
    assert sum(data["test_seen"]) == 1
    assert all(s == "train" for s, t in zip(data["split"], data["test_seen"]) if t)
    levels = [lvl for lvl in data["level"] if lvl is not None]
    assert sorted(levels) == [0, 1, 2, 3, 4, 5]
    by_level = sorted((lvl, len(b)) for lvl, b in zip(data["level"], data["banned"]) if lvl is not None)
    assert [n for _, n in by_level] == sorted(n for _, n in by_level)
    for banned, allowed in zip(data["banned"], data["allowed"]):
        assert sorted(banned + allowed) == sorted(CATEGORIES)
    table = pq.read_table(tmp_path / "profiles" / "profiles.parquet")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[32]"
    assert manifest.stats["embedding_dim"] == 32 and manifest.stats["embedding_pooling"] == "mean"
    assert (tmp_path / "profiles" / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "profiles" / "report.json").read_text())
    assert report["splits"] == {"val": 1, "test_unseen": 1, "train": 22, "test_seen": 1}
    # The rules labeller satisfies every rule, by construction.
    assert all(r["satisfied"] == r["applicable"] for r in report["rule_agreement"]["rules"])
    # Up to date: a second run is skipped and returns the same manifest.
    assert run_stage(profiles_stage.STAGE, config, RunDir(tmp_path)).fingerprint == manifest.fingerprint


def test_resume_after_interruption_gives_identical_parquet(tmp_path, tiny_llama, monkeypatch, spec):
    config = make_config(tiny_llama, labeller="llm", embedding_batch_size=4)
    monkeypatch.setattr(profiles_stage, "make_stage_backend",
                        lambda cfg: ScriptedBackend(cfg.llm, rules_reply(spec)))
    clean = tmp_path / "clean"
    run_stage(profiles_stage.STAGE, config, RunDir(clean))

    broken = tmp_path / "broken"
    real_embed = user_embedding.StatementEmbedder.embed
    calls = {"n": 0}

    def crash_after_two_batches(self, conversations):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real_embed(self, conversations)

    monkeypatch.setattr(user_embedding.StatementEmbedder, "embed", crash_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_stage(profiles_stage.STAGE, config, RunDir(broken))
    assert not (broken / "profiles" / "manifest.json").exists()
    assert len(RunDir(broken).stage("profiles").items("embeddings").done_keys()) == 8
    assert len(RunDir(broken).stage("profiles").items("bans").done_keys()) == 24
    monkeypatch.setattr(user_embedding.StatementEmbedder, "embed", real_embed)
    answered = []
    monkeypatch.setattr(profiles_stage, "make_stage_backend",
                        lambda cfg: ScriptedBackend(cfg.llm, lambda r, s: answered.append(r.key) or "{}"))
    run_stage(profiles_stage.STAGE, config, RunDir(broken))
    assert answered == []  # every label came from the item cache
    assert read(broken) == read(clean)
    assert (broken / "profiles" / "profiles.parquet").read_bytes() == (clean / "profiles" / "profiles.parquet").read_bytes()


def test_llm_labeller_rejects_fail_or_exclude(tmp_path, tiny_llama, monkeypatch, spec):
    from sage_builder.stages.profiles.demographics import sample_psalign

    victim = sample_psalign(spec, 24, 2025)[3]
    fail_for = {json.dumps(victim.published())}
    backends = []

    def factory(cfg):
        backends.append(ScriptedBackend(cfg.llm, rules_reply(spec, fail_for)))
        return backends[-1]

    monkeypatch.setattr(profiles_stage, "make_stage_backend", factory)
    config = make_config(tiny_llama, labeller="llm")
    with pytest.raises(SageError, match=r"1 of 24 users have no valid LLM labelling after 2 attempts "
                                        r"\(e\.g\. user 0000004: refusal"):
        run_stage(profiles_stage.STAGE, config, RunDir(tmp_path))
    assert not (tmp_path / "profiles" / "manifest.json").exists()
    assert not (tmp_path / "profiles" / "profiles.parquet").exists()
    rejects = pq.read_table(tmp_path / "profiles" / "rejects.parquet").to_pylist()
    assert [(r["user_id"], r["reason"], r["attempts"]) for r in rejects] == [("0000004", "refusal", 2)]
    assert len([k for k, _ in backends[0].calls if k == rejects[0]["item_key"]]) == 2

    config = make_config(tiny_llama, labeller="llm", on_rejected="exclude")
    manifest = run_stage(profiles_stage.STAGE, config, RunDir(tmp_path))
    # Accepted labels were cached by the failed run: only the rejected user is asked again.
    assert [k for k, _ in backends[1].calls] == [rejects[0]["item_key"]] * 2
    data = read(tmp_path)
    assert "0000004" not in data["user_id"] and len(data["user_id"]) == 24
    assert manifest.stats["excluded_users"] == ["0000004"]
    report = json.loads((tmp_path / "profiles" / "report.json").read_text())
    assert report["rejected_users"] == ["0000004"] and report["bans"]["users"] == 23
    assert set(data["labeller"][:-1]) == {"llm"}


def test_llm_labeller_request_and_schema(tmp_path, tiny_llama, monkeypatch, spec):
    seen = []

    def reply(request, seed):
        seen.append(request)
        if request.key != seen[0].key:
            return '{"forbidden": []}'
        first_try = sum(r.key == request.key for r in seen) == 1
        return TransportFailure("timeout") if first_try else json.dumps({"forbidden": ["Sexuality", "Sexuality"]})

    monkeypatch.setattr(profiles_stage, "make_stage_backend", lambda cfg: ScriptedBackend(cfg.llm, reply))
    config = make_config(tiny_llama, labeller="llm", rules="report", n_users=3, add_permissive_user=False)
    run_stage(profiles_stage.STAGE, config, RunDir(tmp_path))
    first = seen[0]
    schema = first.json_schema()
    assert schema["properties"]["forbidden"]["items"] == {"$ref": "#/$defs/Category"}
    assert schema["$defs"]["Category"]["enum"] == CATEGORIES
    user = first.messages[-1]["content"]
    assert '{"Age": 18, "Age_Group": "adolescents", "Gender": "male", "Religion": "Islam", ' in user
    assert "Under 18" in user and ", ".join(CATEGORIES) in user
    data = read(tmp_path)
    # The retried user got the second reply: duplicates removed, not "nothing banned" by default.
    assert data["banned"] == [["Sexuality"], [], []]
    assert [r.key for r in seen].count(seen[0].key) == 2
    report = json.loads((tmp_path / "profiles" / "report.json").read_text())
    assert report["bans"]["ban_rate"]["Sexuality"] == round(1 / 3, 4)


def _bad_run(tmp_path, config):
    with pytest.raises(SageError) as info:
        run_stage(profiles_stage.STAGE, config, RunDir(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="profiles.n_users"):
        make_config(tiny_llama, n_users=0)
    assert "unknown category 'Illegal Activity'" in _bad_run(
        tmp_path, config_from_dict({**make_config(tiny_llama).model_dump(mode="json", exclude={"source"}),
                                    "categories": CATEGORIES + ["Illegal Activity"]}))
    bad = yaml.safe_load((REPO / "profiles" / "demographics.yaml").read_text())
    bad["attributes"]["mental_condition"]["p"][0] = 0.2
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(bad))
    message = _bad_run(tmp_path, make_config(tiny_llama, demographics=str(tmp_path / "d.yaml")))
    assert "attributes.mental_condition.p: probabilities sum to 1.05, not 1" in message
    message = _bad_run(tmp_path, make_config(tmp_path / "nowhere", labeller="llm"))
    assert message.startswith("llm.model: ") and "does not exist" in message and "make models" in message
    message = _bad_run(tmp_path, make_config(tiny_llama, embedding_model=str(tmp_path / "nope")))
    assert message.startswith("profiles.embedding_model: ")
    config = make_config(tiny_llama, labeller="llm")
    config.llm.backend = "openai"
    config.llm.base_url = "http://127.0.0.1:9/v1"
    config.llm.request_timeout_s = 2
    assert "no OpenAI-compatible server answers at http://127.0.0.1:9/v1" in _bad_run(tmp_path, config)


def test_cli_bad_input_exit_code(tmp_path):
    pipeline = tmp_path / "p.yaml"
    data = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    data["profiles"]["n_users"] = 0
    pipeline.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["stage", "profiles", "--config", str(pipeline), "--run-dir",
                                      str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "profiles.n_users" in result.output and str(pipeline) in result.output
    assert not (tmp_path / "run").exists()


def test_cli_missing_model_writes_nothing(tmp_path):
    result = CliRunner().invoke(app, ["stage", "profiles", "--run-dir", str(tmp_path / "run"),
                                      "--set", f"llm.model={tmp_path / 'missing-model'}"])
    assert result.exit_code != 0
    assert f"llm.model: {tmp_path / 'missing-model'} does not exist" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_stage_end_to_end_with_smollm2(tmp_path, smollm2_dir):
    """The real thing at toy size: SmolLM2-135M labels through the transformers backend (llguidance
    constrained decoding) and embeds; replies are schema-valid and the report is complete."""
    config = make_config(smollm2_dir, labeller="llm", n_users=6, on_rejected="exclude")
    config.llm.max_new_tokens = 64
    manifest = run_stage(profiles_stage.STAGE, config, RunDir(tmp_path))
    data = read(tmp_path)
    rejects = pq.read_table(tmp_path / "profiles" / "rejects.parquet").num_rows
    assert len(data["user_id"]) - 1 + rejects == 6
    assert set(data["labeller"][:-1]) == {"llm"}
    assert all(set(b) <= set(CATEGORIES) for b in data["banned"])
    assert manifest.stats["embedding_dim"] == 576
    raws = pq.read_table(RunDir(tmp_path).stage("profiles").items("bans").parts()[0]).column("raw").to_pylist()
    assert all(json.loads(r).keys() == {"forbidden"} for r in raws)
    report = json.loads((tmp_path / "profiles" / "report.json").read_text())
    assert report["llm"]["backend"] == "transformers" and report["llm"]["temperature"] == 0.7
    assert len(report["rule_agreement"]["rules"]) == 4


@pytest.mark.slow
def test_stage_at_1000_users_with_rules(tmp_path, tiny_llama):
    """The published scale: 1,000 psalign users + the permissive one, split 900/50/50 + 50 seen."""
    config = make_config(tiny_llama, n_users=1000, tsne_perplexity=30, embedding_batch_size=64)
    run_stage(profiles_stage.STAGE, config, RunDir(tmp_path))
    data = read(tmp_path)
    assert len(data["user_id"]) == 1001 and data["user_id"][-1] == "0001001"
    assert [data["split"].count(s) for s in ("train", "val", "test_unseen", "reference")] == [900, 50, 50, 1]
    assert sum(data["test_seen"]) == 50
    assert sorted(lvl for lvl in data["level"] if lvl is not None) == [0, 1, 2, 3, 4, 5]
    report = json.loads((tmp_path / "profiles" / "report.json").read_text())
    shares = {g: round(100 * v["share"], 1) for g, v in report["age_groups"].items()}
    assert shares == {"infants & toddlers": 1.1, "children": 14.3, "adolescents": 22.5, "young adults": 21.6,
                      "middle-aged": 23.2, "young elderly": 12.7, "elderly": 3.9, "long-lived elderly": 0.8}
    rules = report["rule_agreement"]["rules"]
    assert rules[0]["applicable"] == 725 and rules[3]["applicable"] == 40
    assert report["bans"]["ban_nothing"] == 40  # the rules labeller bans nothing for exactly those 40


def test_plan_counts_users_and_llm_calls(tiny_llama):
    plan = profiles_stage.STAGE.plan(make_config(tiny_llama, labeller="llm", n_users=1000))
    assert (plan.items, plan.unit, plan.llm_calls) == (1001, "users", 1000)
    assert "up to 2000 LLM calls" in plan.notes[1]
    assert profiles_stage.STAGE.plan(make_config(tiny_llama)).llm_calls is None
