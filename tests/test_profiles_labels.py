"""Stage 1's labels: mandatory rules enforced in the LLM's request and schema, the published-format
labels file, the published splits, and the warnings when labels carry no personalization."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.config import config_from_dict
from sage_builder.errors import SageError
from sage_builder.llm.scripted import ScriptedBackend
from sage_builder.stages.base import run_stage
from sage_builder.stages.profiles import clustering, labelling, stage as profiles_stage
from sage_builder.stages.profiles.demographics import load_demographics, sample_psalign
from sage_builder.stages.profiles.labels_file import LABEL_COLUMNS
from sage_builder.stages.profiles.report import label_warnings
from sage_builder.store import RunDir
from sage_builder.testing.tiny_llm import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"]
RULE1 = ["Violence", "Self-Harm", "Sexuality"]
PUBLISHED_SPLITS = REPO / "profiles" / "published_splits.csv"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=32)


@pytest.fixture(scope="module")
def spec():
    return load_demographics(REPO / "profiles" / "demographics.yaml")


def make_config(model: Path, **profiles):
    return config_from_dict({
        "name": "t", "seed": 2025,
        "llm": {"backend": "transformers", "model": str(model), "temperature": 0.7, "max_attempts": 2,
                "device": "cpu", "dtype": "float32", "max_new_tokens": 48},
        "profiles": {"n_users": 24, "sampler": "psalign", "labeller": "llm", "tsne_perplexity": 5, **profiles}})


def read(run: Path) -> dict:
    return pq.read_table(run / "profiles" / "profiles.parquet").to_pydict()


def report_of(run: Path) -> dict:
    return json.loads((run / "profiles" / "report.json").read_text())


def published_format_file(path: Path, spec, n: int = 1000, seed: int = 7, permissive: bool = True) -> list[list[str]]:
    """A users.csv like the authors' (psalign users in id order, list literals, no id column, the
    permissive user last) with seeded random banned lists; returns the banned lists."""
    rng = random.Random(seed)
    users = sample_psalign(spec, n, 2025) + ([spec.permissive()] if permissive else [])
    bans = []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LABEL_COLUMNS)
        for i, user in enumerate(users):
            banned = [] if i == n else sorted(rng.sample(CATEGORIES, rng.randint(0, 7)))
            allowed = [c for c in CATEGORIES if c not in banned]
            writer.writerow([*user.published().values(), repr(banned), repr(allowed)])
            bans.append(banned)
    return bans


def scripted(reply_for):
    return lambda cfg: ScriptedBackend(cfg.llm, lambda request, seed: json.dumps({"forbidden": reply_for(request)}))


def test_enforce_fixes_the_mandatory_rules_whatever_the_llm_says(tmp_path, tiny_llama, monkeypatch, spec):
    requests = []

    def nothing(request):
        requests.append(request)
        return []

    monkeypatch.setattr(profiles_stage, "make_stage_backend", scripted(nothing))
    run_stage(profiles_stage.STAGE, make_config(tiny_llama), RunDir(tmp_path))
    data = read(tmp_path)
    users = sample_psalign(spec, 24, 2025)
    for user, banned in zip(users, data["banned"]):
        rule1 = user.age < 18 or user.mental_condition != "healthy"
        assert banned == (RULE1 if rule1 else []), user
    assert len(requests) == 24
    for request in requests:
        schema = request.json_schema()
        enum = schema["$defs"]["Category"]["enum"]
        text = request.messages[-1]["content"]
        if "they forbid Violence, Self-Harm, Sexuality" in text:
            assert enum == ["Hate", "Harassment", "Shocking", "Propaganda"]
            assert schema["properties"]["forbidden"]["maxItems"] == 4
        elif "allows everything" in text:
            assert schema["properties"]["forbidden"]["maxItems"] == 0
        else:
            assert enum == CATEGORIES
        assert "(mandatory)" in text and "consider" in text
    report = report_of(tmp_path)
    hard = report["rule_agreement"]["hard_rules"]
    assert hard["satisfied"] == hard["applicable"] == 19  # 18 under rule 1, 1 under rule 4
    rows = {r["rule"].split(" ->")[0]: r for r in report["rule_agreement"]["rules"]}
    assert rows["under 18 or an unstable mental condition"]["mandatory"] is True
    soft = rows["a non-healthy physical condition"]
    assert soft["mandatory"] is False and soft["category_bans"] == {"Shocking": 0, "Harassment": 0}
    assert report["rules"] == "enforce"


def test_report_mode_is_the_free_answer_and_measures_adherence(tmp_path, tiny_llama, monkeypatch):
    requests = []
    monkeypatch.setattr(profiles_stage, "make_stage_backend",
                        scripted(lambda r: requests.append(r) or ["Hate"]))
    run_stage(profiles_stage.STAGE, make_config(tiny_llama, rules="report"), RunDir(tmp_path))
    assert all(r.json_schema()["$defs"]["Category"]["enum"] == CATEGORIES for r in requests)
    assert "Under 18, or an unstable mental condition" in requests[0].messages[-1]["content"]
    assert set(map(tuple, read(tmp_path)["banned"][:-1])) == {("Hate",)}
    report = report_of(tmp_path)
    assert report["rule_agreement"]["hard_rules"] == {"applicable": 19, "satisfied": 0, "satisfied_share": 0.0}
    rows = {r["rule"].split(" ->")[0]: r for r in report["rule_agreement"]["rules"]}
    assert rows["Islam, Christianity or Buddhism"]["category_bans"] == {"Hate": 20, "Propaganda": 0}
    assert report["warnings"] == [
        "labels look degenerate: mean 1.00 banned categories per user, 0 of 24 ban nothing "
        "(published: mean 3.54, 40 of 1,000 ban nothing)"]


def test_enforced_schema_refuses_a_reply_that_names_a_fixed_category(spec):
    from sage_builder.templates import load_template

    factory = labelling.BanLabelRequestFactory(load_template(REPO / "prompts" / "ban_categories_enforced.txt"),
                                               CATEGORIES, {"model": "m"}, spec)
    child = sample_psalign(spec, 24, 2025)[1]
    assert labelling.mandate_of(spec, child, CATEGORIES).banned == tuple(RULE1)
    request = factory.request("0000002", child)
    reply = request.schema.model_validate_json('{"forbidden": ["Shocking"]}')
    with pytest.raises(ValidationError):  # fixed already, so not in the enum
        request.schema.model_validate_json('{"forbidden": ["Sexuality"]}')
    adult = factory.request("0001001", spec.permissive())
    adult.schema.model_validate_json('{"forbidden": []}')
    with pytest.raises(ValidationError):
        adult.schema.model_validate_json('{"forbidden": ["Hate"]}')
    assert factory.banned(reply, child) == ["Violence", "Self-Harm", "Sexuality", "Shocking"]
    # The report-mode key is today's: earlier free answers stay valid cache entries.
    free = labelling.BanLabelRequestFactory(factory.template, CATEGORIES, {"model": "m"})
    assert free.key("0000002", child) != factory.key("0000002", child)


@pytest.mark.parametrize("name, enforce", [("ban_categories.txt", False), ("ban_categories_enforced.txt", True)])
def test_ban_templates_put_the_user_last(spec, name, enforce):
    """Two users' requests share every token up to "User profile: " (the cached engine prefills it once)."""
    from sage_builder.templates import load_template

    factory = labelling.BanLabelRequestFactory(load_template(REPO / "prompts" / name), CATEGORIES, {"model": "m"},
                                               spec if enforce else None)
    child, adult = sample_psalign(spec, 24, 2025)[1], spec.permissive()
    one, other = (factory.request(uid, user).messages for uid, user in (("0000002", child), ("0001001", adult)))
    assert one[:-1] == other[:-1]
    a, b = one[-1]["content"], other[-1]["content"]
    shared = a.index("User profile: ") + len("User profile: ")
    assert a[:shared] == b[:shared] and a[shared:] != b[shared:]
    assert "Reply with" in a[:shared]  # the instruction comes before the fields


@pytest.mark.slow
def test_enforce_with_constrained_decoding_of_a_random_model(tmp_path, tiny_llama):
    """A random-weight Llama through the transformers backend (llguidance): gibberish in spirit,
    yet every reply is schema-valid and every mandatory rule holds."""
    run_stage(profiles_stage.STAGE, make_config(tiny_llama, n_users=5), RunDir(tmp_path))
    hard = report_of(tmp_path)["rule_agreement"]["hard_rules"]
    assert hard["satisfied"] == hard["applicable"] > 0
    assert pq.read_table(tmp_path / "profiles" / "rejects.parquet").num_rows == 0


def test_labels_file_gives_the_files_banned_lists(tmp_path, tiny_llama, spec):
    labels = tmp_path / "users.csv"
    bans = published_format_file(labels, spec, n=30, permissive=False)
    manifest = run_stage(profiles_stage.STAGE, make_config(tiny_llama, labeller="file", labels_file=str(labels)),
                         RunDir(tmp_path / "run"))
    data = read(tmp_path / "run")
    assert data["banned"] == [[c for c in CATEGORIES if c in b] for b in bans[:24]] + [[]]
    assert set(data["labeller"][:-1]) == {"file"} and data["labeller"][-1] == "fixed"
    assert report_of(tmp_path / "run")["labels_file"] == "users.csv"
    assert manifest.stats["labeller"] == "file"


def _rewrite(path: Path, edit) -> None:
    rows = list(csv.reader(path.open()))
    edit(rows)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


BAD_FILES = [
    ("missing column", lambda rows: [r.pop(7) for r in rows], "column Allowed_Categories is missing"),
    ("unknown category", lambda rows: rows[3].__setitem__(6, "['Hate', 'Gore']"),
     "line 4 (user 0000003): Banned_Categories: unknown category 'Gore'"),
    ("malformed list", lambda rows: rows[2].__setitem__(6, "['Hate', "),
     "line 3 (user 0000002): Banned_Categories \"['Hate', \" is not a Python list literal"),
    ("too few rows", lambda rows: rows.__delitem__(slice(20, None)), "19 rows for 24 users"),
    ("other users", lambda rows: rows[6].__setitem__(3, "Islam" if rows[6][3] != "Islam" else "None"),
     "line 7 (user 0000006): Religion is"),
]


@pytest.mark.parametrize("case,edit,message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_labels_file_is_one_line_exit_2_and_writes_nothing(tmp_path, spec, tiny_llama, case, edit, message):
    labels = tmp_path / "users.csv"
    published_format_file(labels, spec, n=30, permissive=False)
    _rewrite(labels, edit)
    result = CliRunner().invoke(app, ["stage", "profiles", "--run-dir", str(tmp_path / "run"),
                                      "--set", f"llm.model={tiny_llama}", "--set", "llm.device=cpu",
                                      "--set", "profiles.labeller=file", "--set", f"profiles.labels_file={labels}"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()


def test_rules_entry_with_an_unknown_value_is_one_line_exit_2(tmp_path, tiny_llama):
    bad = yaml.safe_load((REPO / "profiles" / "demographics.yaml").read_text())
    bad["ban_rules"][2]["when"] = {"religion": ["Islam", "Christianity", "Hinduism"]}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["stage", "profiles", "--run-dir", str(tmp_path / "run"),
                                      "--set", f"llm.model={tiny_llama}", "--set", "profiles.labeller=rules",
                                      "--set", f"profiles.demographics={tmp_path / 'd.yaml'}"])
    assert result.exit_code == 2
    assert "ban_rules.2.when.0.religion: unknown value 'Hinduism'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_contradicting_mandatory_rules_stop_before_anything_is_written(tmp_path, tiny_llama):
    bad = yaml.safe_load((REPO / "profiles" / "demographics.yaml").read_text())
    bad["ban_rules"][2]["mandatory"] = True
    bad["ban_rules"][2]["when"] = {"religion": ["None"]}  # now contradicts rule 4 for healthy adults
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SageError, match=r"ban_rules\.\d: mandatory rules contradict each other"):
        run_stage(profiles_stage.STAGE, make_config(tiny_llama, demographics=str(tmp_path / "d.yaml")),
                  RunDir(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_published_splits_members_at_1000_users():
    ids = [f"{i:07d}" for i in range(1, 1001)]
    split, seen, sizes = clustering.published_splits(PUBLISHED_SPLITS, ids, 1000)
    published = {}
    for row in csv.DictReader(PUBLISHED_SPLITS.open()):
        published.setdefault(row["split"], set()).add(row["user_id"])
    assert {uid for uid in ids if split[uid] == "val"} == published["val"]
    assert {uid for uid in ids if split[uid] == "test_unseen"} == published["test_unseen"]
    assert seen == published["test_seen"] and all(split[uid] == "train" for uid in seen)
    assert sizes == {"val": 50, "test_unseen": 50, "train": 900, "test_seen": 50}


def test_psalign_splits_for_users_that_do_not_exist_is_one_line(tmp_path, tiny_llama):
    result = CliRunner().invoke(app, ["stage", "profiles", "--run-dir", str(tmp_path / "run"),
                                      "--set", f"llm.model={tiny_llama}", "--set", "profiles.labeller=rules",
                                      "--set", "profiles.n_users=24", "--set", "profiles.splits=psalign"])
    assert result.exit_code == 2
    assert "does not exist: profiles.n_users is 24; psalign splits need the users they name" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_degenerate_labels_warn_in_one_line():
    base = {"users": 24, "ban_nothing": 23, "mean_banned": 0.21, "published_mean_banned": 3.54,
            "published_ban_nothing": 40}
    assert label_warnings(base, [0, 0, 0, 0, 0, 0]) == [
        "labels look degenerate: 23 of 24 users ban nothing, mean 0.21 banned "
        "(published: mean 3.54, 40 of 1,000 ban nothing)",
        "the 6 reference levels all ban 0 categories: the level grid shows no difference between levels"]
    assert label_warnings({**base, "ban_nothing": 2, "mean_banned": 3.1}, [0, 2, 3, 3, 5, 6]) == []
    assert len(label_warnings({**base, "ban_nothing": 0, "mean_banned": 6.5}, [0, 7])) == 1


def test_sage_status_shows_the_warning(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(profiles_stage, "make_stage_backend", scripted(lambda r: []))
    run_stage(profiles_stage.STAGE, make_config(tiny_llama, rules="report"), RunDir(tmp_path))
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    text = " ".join(result.output.split())  # status wraps its lines at 80 columns
    assert text.count("warning: ") == 2
    assert ("warning: labels look degenerate: 24 of 24 users ban nothing, mean 0.00 banned "
            "(published: mean 3.54, 40 of 1,000 ban nothing)") in text
    assert ("warning: the 6 reference levels all ban 0 categories: the level grid shows no "
            "difference between levels") in text


@pytest.mark.slow
def test_psalign_users_labels_and_splits_reproduce_the_published_file(tmp_path, tiny_llama, spec):
    """The published format at full size: 1,000 psalign users + the permissive one, banned lists from
    the file, split members from the published splits."""
    labels = tmp_path / "users.csv"
    bans = published_format_file(labels, spec)
    config = make_config(tiny_llama, n_users=1000, labeller="file", labels_file=str(labels), splits="psalign",
                         tsne_perplexity=30, embedding_batch_size=64)
    run_stage(profiles_stage.STAGE, config, RunDir(tmp_path / "run"))
    data = read(tmp_path / "run")
    rows = list(csv.DictReader(labels.open()))
    assert len(data["user_id"]) == len(rows) == 1001
    for i, row in enumerate(rows):
        assert [data[k][i] for k in ("age", "age_group", "gender", "religion", "physical_condition",
                                     "mental_condition")] == [int(row["Age"]), *[row[c] for c in LABEL_COLUMNS[1:6]]]
        assert sorted(data["banned"][i]) == sorted(bans[i])
    published = {row["user_id"]: row["split"] for row in csv.DictReader(PUBLISHED_SPLITS.open())}
    roles = {uid: "test_seen" if seen else split for uid, split, seen in
             zip(data["user_id"], data["split"], data["test_seen"])}
    assert roles.pop("0001001") == "reference"
    assert roles == {f"{i:07d}": published.get(f"{i:07d}", "train") for i in range(1, 1001)}
    assert all(split == "train" for split, seen in zip(data["split"], data["test_seen"]) if seen)
