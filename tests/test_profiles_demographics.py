"""Stage 1 demographics: the psalign sampler reproduces the published users; the YAML is validated."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from sage_builder.cli import app
from sage_builder.errors import ConfigError
from sage_builder.stages.profiles.demographics import (
    check_categories, load_demographics, sample_config, sample_psalign, sample_users,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "profiles" / "demographics.yaml"
CATEGORIES = ["Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda"]
# SPEC 1.1: shares over the 1,001 published users (the 1,000 sampled plus the permissive one).
PUBLISHED_SHARES = {"middle-aged": 23.2, "adolescents": 22.5, "young adults": 21.6, "children": 14.3,
                    "young elderly": 12.7, "elderly": 3.9, "infants & toddlers": 1.1, "long-lived elderly": 0.8}


@pytest.fixture(scope="module")
def spec():
    return load_demographics(SHIPPED)


@pytest.fixture(scope="module")
def published_users(spec):
    return sample_psalign(spec, 1000, 2025)


def test_psalign_reproduces_published_age_group_shares(spec, published_users):
    counts = Counter(u.age_group for u in published_users)
    counts[spec.permissive().age_group] += 1
    shares = {g: round(100 * n / 1001, 1) for g, n in counts.items()}
    assert shares == PUBLISHED_SHARES


def test_psalign_is_the_spec_procedure_on_the_global_generator(spec, published_users):
    """SPEC 1.1 written out literally on np.random's global state gives the same 1,000 users."""
    groups = [("infants & toddlers", 0, 3), ("children", 4, 12), ("adolescents", 13, 19), ("young adults", 20, 34),
              ("middle-aged", 35, 59), ("young elderly", 60, 74), ("elderly", 75, 89),
              ("long-lived elderly", 90, 100)]
    religions = ["Christianity", "Islam", "Buddhism", "None"]
    physical = ["visual impairment", "hearing impairment", "intellectual disability", "healthy"]
    mental = ["depression", "anxiety", "war", "sexual assault", "major accidents", "natural disasters", "healthy"]
    state = np.random.get_state()
    users = []
    try:
        np.random.seed(2025)
        while len(users) < 1000:
            g = np.random.choice(8, p=[0.05, 0.2, 0.2, 0.2, 0.2, 0.1, 0.04, 0.01])
            name, low, high = groups[g]
            age = np.random.randint(low, high + 1)
            gender = np.random.choice(["male", "female"])
            rel = np.random.choice(religions, p=[0.3, 0.2, 0.2, 0.3])
            phy = np.random.choice(physical, p=[0.2, 0.2, 0.2, 0.4])
            men = np.random.choice(mental, p=[0.15, 0.15, 0.075, 0.075, 0.075, 0.075, 0.4])
            if name == "infants & toddlers" and men not in ("healthy", "natural disasters"):
                continue
            if name == "children" and men in ("war", "sexual assault"):
                continue
            if (men == "war" and age < 18) or (men == "sexual assault" and age < 10):
                continue
            if men in ("major accidents", "depression", "anxiety") and age < 5:
                continue
            if rel != "None" and age < 8:
                continue
            users.append((int(age), name, str(gender), str(rel), str(phy), str(men)))
    finally:
        np.random.set_state(state)
    assert [tuple(u.as_dict().values()) for u in published_users] == users
    assert users[0] == (18, "adolescents", "male", "Islam", "healthy", "healthy")


def test_published_rule_counts_follow(spec, published_users):
    # SPEC 1.2: the first rule applies to 725 published users; 40 users fit the allow-all rule.
    applicable = [sum(rule.applies_to(u) for u in published_users) for rule in spec.ban_rules]
    assert applicable[0] == 725
    assert applicable[3] == 40


def test_every_record_is_realistic(spec, published_users):
    config_users = sample_config(spec, 1000, 7)
    for user in published_users + config_users:
        group = spec.group_by_name[user.age_group]
        assert group.low <= user.age <= group.high
        if user.age_group == "infants & toddlers":
            assert user.mental_condition in ("healthy", "natural disasters")
        if user.age_group == "children":
            assert user.mental_condition not in ("war", "sexual assault")
        if user.mental_condition == "war":
            assert user.age >= 18
        if user.mental_condition == "sexual assault":
            assert user.age >= 10
        if user.mental_condition in ("major accidents", "depression", "anxiety"):
            assert user.age >= 5
        if user.religion != "None":
            assert user.age >= 8


def test_config_sampler_uses_the_modern_generator_deterministically(spec, published_users):
    a = sample_config(spec, 200, 2025)
    assert a == sample_config(spec, 200, 2025)
    assert a != published_users[:200]
    shares = Counter(u.age_group for u in sample_config(spec, 3000, 1))
    assert abs(shares["middle-aged"] / 3000 - 0.232) < 0.03


def test_permissive_user(spec):
    assert spec.permissive().as_dict() == {"age": 35, "age_group": "middle-aged", "gender": "male",
                                           "religion": "None", "physical_condition": "healthy",
                                           "mental_condition": "healthy"}


def _variant(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(SHIPPED.read_text())
    edit(data)
    path = tmp_path / "demographics.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["attributes"]["religion"].update(p=[0.3, 0.2, 0.2, 0.2]), "attributes.religion.p: probabilities sum to 0.9, not 1"),
    (lambda d: d["age_groups"][0].update(p=0.06), "age_groups.p: probabilities sum to 1.01, not 1"),
    (lambda d: d["realism"][0]["when"].update(hair=["red"]), "realism.0.when.0.hair: unknown attribute"),
    (lambda d: d["realism"][2]["when"].update(mental_condition=["warr"]), "unknown value 'warr'"),
    (lambda d: d.update(colour=1), "colour: unknown key"),
])
def test_bad_demographics_are_one_line_errors(tmp_path, edit, message):
    path = _variant(tmp_path, edit)
    with pytest.raises(ConfigError) as info:
        load_demographics(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text and message in text


def test_categories_must_match_the_rules(tmp_path, spec):
    check_categories(spec, CATEGORIES)
    with pytest.raises(ConfigError, match="unknown category 'Illegal Activity'"):
        check_categories(spec, CATEGORIES + ["Illegal Activity"], "pipelines/x.yaml")
    with pytest.raises(ConfigError, match=r"ban_rules\.0\.ban: category 'Self-Harm' is not in"):
        check_categories(spec, [c for c in CATEGORIES if c != "Self-Harm"])


def test_n_users_must_be_positive(spec):
    with pytest.raises(ConfigError, match="n_users must be > 0"):
        sample_users(spec, "psalign", 0, 2025)


def test_users_sample_csv_contract(tmp_path):
    out = tmp_path / "users.csv"
    result = CliRunner().invoke(app, ["users", "sample", "--sampler", "psalign", "--seed", "2025", "-n", "1000",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["Age", "Age_Group", "Gender", "Religion", "Physical_Condition", "Mental_Condition"]
    assert len(rows) == 1000
    assert rows[0] == {"Age": "18", "Age_Group": "adolescents", "Gender": "male", "Religion": "Islam",
                       "Physical_Condition": "healthy", "Mental_Condition": "healthy"}
    groups = Counter(r["Age_Group"] for r in rows)
    assert groups["middle-aged"] == 231 and groups["long-lived elderly"] == 8

    other = tmp_path / "config.csv"
    result = CliRunner().invoke(app, ["users", "sample", "--sampler", "config", "--seed", "3", "-n", "5",
                                      "-o", str(other)])
    assert result.exit_code == 0 and len(other.read_text().splitlines()) == 6


def test_users_sample_bad_input_writes_nothing(tmp_path):
    out = tmp_path / "users.csv"
    result = CliRunner().invoke(app, ["users", "sample", "--sampler", "nope", "-n", "3", "-o", str(out)])
    assert result.exit_code != 0 and "unknown sampler" in result.output and not out.exists()
    bad = _variant(tmp_path, lambda d: d["attributes"]["gender"].update(p=[0.5, 0.6]))
    result = CliRunner().invoke(app, ["users", "sample", "-n", "3", "-o", str(out), "--demographics", str(bad)])
    assert result.exit_code != 0 and "attributes.gender.p" in result.output and not out.exists()
