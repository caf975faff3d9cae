"""Simulated users' demographics: the distributions and rules of ``profiles/demographics.yaml``,
and the two samplers that draw from them.

* ``psalign`` is the PSA authors' procedure with their random stream (NumPy's legacy
  ``RandomState``, i.e. MT19937 seeded like ``np.random.seed``): group, age, gender, religion,
  physical, mental, in that order, redrawing whole records that break a realism rule. With the
  shipped YAML and seed 2025 it reproduces the published 1,000 users bit-exactly.
* ``config`` draws the same way from the same YAML with NumPy's modern ``default_rng`` (PCG64).
  Same distributions, different stream: for a given seed it gives other users than ``psalign``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from sage_builder.config import StrictModel
from sage_builder.errors import ConfigError, SageError

ATTRIBUTES = ("age", "age_group", "gender", "religion", "physical_condition", "mental_condition")
DRAWN_ATTRIBUTES = ("gender", "religion", "physical_condition", "mental_condition")
# Column names of the authors' published user table (and of `sage users sample`).
PUBLISHED_COLUMNS = {"age": "Age", "age_group": "Age_Group", "gender": "Gender", "religion": "Religion",
                     "physical_condition": "Physical_Condition", "mental_condition": "Mental_Condition"}
PROBABILITY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Demographics:
    """One simulated user's six attributes."""

    age: int
    age_group: str
    gender: str
    religion: str
    physical_condition: str
    mental_condition: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def published(self) -> dict[str, Any]:
        """The attributes under the authors' column names (what the LLM is shown as JSON)."""
        return {PUBLISHED_COLUMNS[k]: v for k, v in asdict(self).items()}


class Matcher(StrictModel):
    in_: list[str] | None = Field(None, alias="in")
    not_in: list[str] | None = None
    min: int | None = None
    max: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _list_means_in(cls, value: Any) -> Any:
        return {"in": value} if isinstance(value, list) else value

    def matches(self, value: Any) -> bool:
        if self.in_ is not None and value not in self.in_:
            return False
        if self.not_in is not None and value in self.not_in:
            return False
        if self.min is not None and value < self.min:
            return False
        return not (self.max is not None and value > self.max)

    def values(self) -> list[str]:
        return [*(self.in_ or []), *(self.not_in or [])]


Condition = dict[str, Matcher]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


def condition_holds(condition: Condition, user: Demographics) -> bool:
    return all(matcher.matches(getattr(user, attr)) for attr, matcher in condition.items())


class RealismRule(StrictModel):
    rule: str
    when: list[Condition]
    require: Condition

    _as_list = model_validator(mode="before")(lambda cls, v: {**v, "when": _as_list(v.get("when"))}
                                               if isinstance(v, dict) else v)

    def broken_by(self, user: Demographics) -> bool:
        applies = any(condition_holds(c, user) for c in self.when)
        return applies and not condition_holds(self.require, user)


class BanRule(StrictModel):
    rule: str
    when: list[Condition]
    ban: list[str]
    allow_all: bool = False
    mandatory: bool = Field(False, description="a hard rule: enforced in the LLM's request and schema "
                                               "under profiles.rules: enforce")

    _as_list = model_validator(mode="before")(lambda cls, v: {**v, "when": _as_list(v.get("when"))}
                                               if isinstance(v, dict) else v)

    def applies_to(self, user: Demographics) -> bool:
        return any(condition_holds(c, user) for c in self.when)


class AgeGroup(StrictModel):
    name: str
    low: int = Field(ge=0)
    high: int = Field(ge=0)
    p: float = Field(ge=0.0, le=1.0)


class Attribute(StrictModel):
    values: list[str] = Field(min_length=1)
    p: list[float] | None = Field(None, description="probabilities in the order of values; none = uniform")


class DemographicsSpec(StrictModel):
    age_groups: list[AgeGroup] = Field(min_length=1)
    attributes: dict[Literal["gender", "religion", "physical_condition", "mental_condition"], Attribute]
    realism: list[RealismRule] = Field(default_factory=list)
    permissive_user: dict[str, Any]
    ban_rules: list[BanRule] = Field(min_length=1)
    source: Path | None = None

    @cached_property
    def group_by_name(self) -> dict[str, AgeGroup]:
        return {g.name: g for g in self.age_groups}

    def values_of(self, attribute: str) -> list[str] | None:
        if attribute == "age":
            return None
        if attribute == "age_group":
            return [g.name for g in self.age_groups]
        return self.attributes[attribute].values

    def permissive(self) -> Demographics:
        return Demographics(**self.permissive_user)

    def ban_categories(self) -> list[str]:
        seen: list[str] = []
        for rule in self.ban_rules:
            seen.extend(c for c in rule.ban if c not in seen)
        return seen

    def is_realistic(self, user: Demographics) -> bool:
        return not any(rule.broken_by(user) for rule in self.realism)


def _fail(path: Path | str, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {reason}")


def load_demographics(path: Path | str) -> DemographicsSpec:
    """Read and validate the demographics YAML; any problem is one line naming the file and key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: demographics file not found (profiles.demographics; the shipped one is "
                          f"profiles/demographics.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        spec = DemographicsSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise _fail(path, key, msg) from None
    spec.source = path
    _check_spec(spec, path)
    return spec


def _check_probabilities(path: Path, key: str, probs: list[float], n_values: int) -> None:
    if len(probs) != n_values:
        raise _fail(path, key, f"{len(probs)} probabilities for {n_values} values")
    if any(p < 0 for p in probs):
        raise _fail(path, key, "a probability is negative")
    total = float(sum(probs))
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise _fail(path, key, f"probabilities sum to {total:.6g}, not 1")


def _check_condition(spec: DemographicsSpec, path: Path, key: str, condition: Condition) -> None:
    for attr, matcher in condition.items():
        if attr not in ATTRIBUTES:
            raise _fail(path, f"{key}.{attr}", f"unknown attribute (known: {', '.join(ATTRIBUTES)})")
        known = spec.values_of(attr)
        if known is None:
            if matcher.values():
                raise _fail(path, f"{key}.{attr}", "age takes min/max, not values")
            continue
        if matcher.min is not None or matcher.max is not None:
            raise _fail(path, f"{key}.{attr}", "min/max apply to age only")
        for value in matcher.values():
            if value not in known:
                raise _fail(path, f"{key}.{attr}", f"unknown value '{value}' (known: {', '.join(known)})")


def _check_spec(spec: DemographicsSpec, path: Path) -> None:
    _check_probabilities(path, "age_groups.p", [g.p for g in spec.age_groups], len(spec.age_groups))
    for i, group in enumerate(spec.age_groups):
        if group.low > group.high:
            raise _fail(path, f"age_groups.{i}", f"low {group.low} > high {group.high}")
    missing = [a for a in DRAWN_ATTRIBUTES if a not in spec.attributes]
    if missing:
        raise _fail(path, f"attributes.{missing[0]}", "missing")
    for name, attr in spec.attributes.items():
        if len(set(attr.values)) != len(attr.values):
            raise _fail(path, f"attributes.{name}.values", "a value is listed twice")
        if attr.p is not None:
            _check_probabilities(path, f"attributes.{name}.p", attr.p, len(attr.values))
    for i, rule in enumerate(spec.realism):
        for j, cond in enumerate(rule.when):
            _check_condition(spec, path, f"realism.{i}.when.{j}", cond)
        _check_condition(spec, path, f"realism.{i}.require", rule.require)
    for i, rule in enumerate(spec.ban_rules):
        for j, cond in enumerate(rule.when):
            _check_condition(spec, path, f"ban_rules.{i}.when.{j}", cond)
        if rule.allow_all and rule.ban:
            raise _fail(path, f"ban_rules.{i}", "a rule with allow_all: true cannot also ban categories")
    try:
        user = spec.permissive()
    except TypeError as exc:
        raise _fail(path, "permissive_user", f"needs exactly {', '.join(ATTRIBUTES)} ({exc})") from None
    for attr in ATTRIBUTES[1:]:
        if getattr(user, attr) not in (spec.values_of(attr) or []):
            raise _fail(path, f"permissive_user.{attr}", f"unknown value '{getattr(user, attr)}'")


def check_categories(spec: DemographicsSpec, categories: list[str], config_source: str = "config") -> None:
    """The ban rules and the pipeline's categories must name the same categories, exactly."""
    known = set(categories)
    for i, rule in enumerate(spec.ban_rules):
        for category in rule.ban:
            if category not in known:
                raise _fail(spec.source or "demographics", f"ban_rules.{i}.ban",
                            f"category '{category}' is not in the pipeline's categories "
                            f"({', '.join(categories)}); fix the rule or `categories` in {config_source}")
    ruled = set(spec.ban_categories())
    for category in categories:
        if category not in ruled:
            raise ConfigError(f"{config_source}: categories: unknown category '{category}': no ban rule in "
                              f"{spec.source} names it, so no labeller could decide it; add a rule for it")


class SamplingError(SageError):
    pass


def _draws_allowed(n: int) -> int:
    return 1000 * n + 100_000


def _rejection_sample(spec: DemographicsSpec, n: int, draw_group: Callable[[], int],
                      draw_age: Callable[[int, int], int], draw_value: Callable[[Any], str]) -> list[Demographics]:
    """Draw group, age, then each attribute in order; discard a record that breaks a realism rule."""
    users: list[Demographics] = []
    draws = 0
    while len(users) < n:
        draws += 1
        if draws > _draws_allowed(n):
            raise SamplingError(f"{spec.source}: realism rules rejected {draws - 1} records for {len(users)} "
                                f"accepted; they exclude almost every draw")
        group = spec.age_groups[draw_group()]
        age = draw_age(group.low, group.high)
        drawn = {name: draw_value(spec.attributes[name]) for name in DRAWN_ATTRIBUTES}
        user = Demographics(age=age, age_group=group.name, **drawn)
        if spec.is_realistic(user):
            users.append(user)
    return users


def sample_psalign(spec: DemographicsSpec, n: int, seed: int) -> list[Demographics]:
    """The authors' procedure and stream (legacy MT19937 via RandomState, as ``np.random.seed``)."""
    rng = np.random.RandomState(seed)
    group_p = [g.p for g in spec.age_groups]

    def value(attr: Any) -> str:
        # choice without p draws differently from choice with uniform p: keep the authors' call.
        return str(rng.choice(attr.values) if attr.p is None else rng.choice(attr.values, p=attr.p))

    return _rejection_sample(spec, n, lambda: int(rng.choice(len(spec.age_groups), p=group_p)),
                             lambda low, high: int(rng.randint(low, high + 1)), value)


def sample_config(spec: DemographicsSpec, n: int, seed: int) -> list[Demographics]:
    """Same distributions and draw order with NumPy's modern Generator (PCG64)."""
    rng = np.random.default_rng(seed)
    group_p = np.asarray([g.p for g in spec.age_groups], dtype=float)
    group_p = group_p / group_p.sum()

    def value(attr: Any) -> str:
        p = None if attr.p is None else np.asarray(attr.p, dtype=float) / sum(attr.p)
        return str(attr.values[int(rng.choice(len(attr.values), p=p))])

    return _rejection_sample(spec, n, lambda: int(rng.choice(len(spec.age_groups), p=group_p)),
                             lambda low, high: int(rng.integers(low, high, endpoint=True)), value)


SAMPLERS = {"psalign": sample_psalign, "config": sample_config}


def sample_users(spec: DemographicsSpec, sampler: str, n: int, seed: int) -> list[Demographics]:
    if n <= 0:
        raise ConfigError(f"n_users must be > 0 (got {n})")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{sampler}'; choose psalign or config")
    return SAMPLERS[sampler](spec, n, seed)


def user_id(index: int) -> str:
    """1-based position in acceptance order -> the published 7-digit id."""
    return f"{index:07d}"
