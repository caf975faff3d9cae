"""Step 2 of stage 1: banned and allowed categories per user, asked of an LLM (``llm``), derived from
the authors' four rules (``rules``) or read from a file (``file``, see ``labels_file.py``), and how
well the labels follow those rules.

The LLM sees the user's six attributes as JSON under the authors' column names; its reply must be
``{"forbidden": [<category>, ...]}`` with categories drawn from a JSON-schema enum. A reply that is
not that, after ``llm.max_attempts`` tries, is a reject: it is never read as "nothing banned".

* ``rules: report`` is the authors' free answer: the rules as prose (``prompts/ban_categories.txt``),
  every category in the enum; adherence is only measured.
* ``rules: enforce`` builds the mandatory rules (``mandatory: true`` in the demographics file) into
  the request and its schema: what they forbid is fixed and left out of the enum, and a user they
  allow everything gets ``maxItems: 0``; so a constrained decoder cannot break them. The LLM decides
  the other categories (the "consider" rules) only.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, create_model

from sage_builder.errors import ConfigError
from sage_builder.llm.base import LLMBackend, LLMRequest, LLMResult, reply_settings
from sage_builder.progress import progress
from sage_builder.stages.profiles.demographics import Demographics, DemographicsSpec
from sage_builder.stages.profiles.labels_file import read_labels_file
from sage_builder.store import ItemCache, stable_hash
from sage_builder.templates import PromptTemplate, load_template

if TYPE_CHECKING:
    from sage_builder.config import PipelineConfig

log = logging.getLogger("sage.profiles")

# SPEC 1.2, over the 1,000 published users.
PUBLISHED_BAN_RATES = {"Sexuality": 0.81, "Propaganda": 0.75, "Shocking": 0.63, "Violence": 0.52,
                       "Self-Harm": 0.41, "Harassment": 0.27, "Hate": 0.15}
PUBLISHED_MEAN_BANNED = 3.54
PUBLISHED_BAN_NOTHING = 40
PUBLISHED_RULE1 = {"applicable": 725, "satisfied": 184}


def ban_reply_schema(categories: list[str], max_items: int | None = None) -> type[BaseModel]:
    """``{"forbidden": [...]}`` whose items are an enum of exactly ``categories``, at most ``max_items``."""
    return _ban_reply_schema(tuple(categories), len(categories) if max_items is None else max_items)


@functools.lru_cache(maxsize=256)
def _ban_reply_schema(categories: tuple[str, ...], max_items: int) -> type[BaseModel]:
    category = enum.Enum("Category", {name: name for name in categories}, type=str)
    return create_model("BanReply", forbidden=(list[category], Field(  # type: ignore[valid-type]
        ..., max_length=max_items, description="the categories this user must not be shown")))


@dataclass(frozen=True)
class Mandate:
    """What the mandatory rules decide for one user: categories they forbid, or that nothing may be."""

    banned: tuple[str, ...]
    allow_all: bool

    def free(self, categories: list[str]) -> list[str]:
        """The categories left to the LLM's decision."""
        return [] if self.allow_all else [c for c in categories if c not in self.banned]

    def sentence(self) -> str:
        if self.allow_all:
            return "a mandatory rule allows everything for this user, so nothing is forbidden."
        if self.banned:
            return f"they forbid {', '.join(self.banned)} for this user."
        return "none applies to this user."


def mandate_of(spec: DemographicsSpec, user: Demographics, categories: list[str]) -> Mandate:
    banned: set[str] = set()
    allow_all = False
    for i, rule in enumerate(spec.ban_rules):
        if rule.mandatory and rule.applies_to(user):
            banned.update(rule.ban)
            allow_all = allow_all or rule.allow_all
            if allow_all and banned:
                raise ConfigError(f"{spec.source}: ban_rules.{i}: mandatory rules contradict each other for "
                                  f"{json.dumps(user.published())} (one allows everything, another forbids "
                                  f"{', '.join(sorted(banned))}); make one of them not mandatory")
    return Mandate(tuple(c for c in categories if c in banned), allow_all)


def rules_prose(spec: DemographicsSpec) -> str:
    """The rules of the demographics file as the enforced request shows them, numbered."""
    return "\n".join(f"{i}. {rule.rule}" + (" (mandatory)" if rule.mandatory else "")
                     for i, rule in enumerate(spec.ban_rules, 1))


def banned_from_reply(reply: BaseModel, categories: list[str]) -> list[str]:
    """The reply's categories, de-duplicated, in the pipeline's category order."""
    named = {getattr(c, "value", c) for c in reply.forbidden}  # type: ignore[attr-defined]
    return [c for c in categories if c in named]


def allowed_of(banned: list[str], categories: list[str]) -> list[str]:
    return [c for c in categories if c not in banned]


def rules_banned(spec: DemographicsSpec, user: Demographics, categories: list[str]) -> list[str]:
    """The ``rules`` labeller: the union of what every applicable rule bans ("consider" = ban)."""
    banned: set[str] = set()
    for rule in spec.ban_rules:
        if rule.applies_to(user):
            banned.update(rule.ban)
    return [c for c in categories if c in banned]


@dataclass
class BanLabelRequestFactory:
    """Builds one LLM request per user; the key covers everything that determines the reply.

    Without ``enforce`` (rules: report) every request offers every category; with it (the
    demographics spec), each user's mandatory rules shape their request and schema."""

    template: PromptTemplate
    categories: list[str]
    llm_settings: dict[str, Any]
    enforce: DemographicsSpec | None = None
    schema: type[BaseModel] = field(init=False)

    def __post_init__(self) -> None:
        self.schema = ban_reply_schema(self.categories)
        self.rules = rules_prose(self.enforce) if self.enforce is not None else None

    def mandate(self, user: Demographics) -> Mandate | None:
        return None if self.enforce is None else mandate_of(self.enforce, user, self.categories)

    def key(self, uid: str, user: Demographics) -> str:
        # The user id is part of the key: two users with equal attributes are asked independently,
        # as the authors did, and get their own sampling seeds.
        parts: list[Any] = [uid, user.as_dict(), self.template.sha256, self.categories, self.llm_settings]
        mandate = self.mandate(user)
        if mandate is not None:
            parts.append({"rules": self.rules, "mandatory_banned": list(mandate.banned),
                          "allow_all": mandate.allow_all})
        return stable_hash("bans", *parts)

    def request(self, uid: str, user: Demographics) -> LLMRequest:
        profile = json.dumps(user.published(), ensure_ascii=False)
        mandate = self.mandate(user)
        if mandate is None:
            messages = self.template.render(user=profile, categories=", ".join(self.categories))
            return LLMRequest(key=self.key(uid, user), messages=messages, schema=self.schema)
        free = mandate.free(self.categories)
        messages = self.template.render(user=profile, rules=self.rules, decided=mandate.sentence(),
                                        categories=", ".join(free) or "none")
        # An empty enum is no schema: with nothing left to decide, any category and at most none.
        schema = ban_reply_schema(free or self.categories, len(free))
        return LLMRequest(key=self.key(uid, user), messages=messages, schema=schema)

    def banned(self, reply: BaseModel, user: Demographics) -> list[str]:
        """The user's banned list: the reply's categories plus what the mandatory rules fixed."""
        mandate = self.mandate(user)
        named = set(banned_from_reply(reply, self.categories)) | set(mandate.banned if mandate else ())
        return [c for c in self.categories if c in named]


def label_with_llm(backend: LLMBackend, factory: BanLabelRequestFactory, users: dict[str, Demographics],
                   on_result: Callable[[LLMResult], None] | None = None) -> Iterator[tuple[str, LLMResult]]:
    """Yield (user_id, settled result) for each user, in completion order."""
    by_key = {factory.key(uid, user): uid for uid, user in users.items()}
    requests = [factory.request(uid, user) for uid, user in users.items()]
    for result in backend.run(requests, progress=on_result):
        yield by_key[result.key], result


@dataclass
class Labels:
    """Step 2's result: banned categories of the accepted users, the rejects, and how the LLM was asked."""

    banned: dict[str, list[str]]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    llm_info: dict[str, Any] | None = None


def label_users(config: PipelineConfig, spec: DemographicsSpec, sampled: dict[str, Demographics],
                cache: ItemCache, make_llm: Callable[[], LLMBackend]) -> Labels:
    """Banned categories per sampled user, by ``profiles.labeller``; LLM answers are saved as they come."""
    pc = config.profiles
    if pc.labeller == "rules":
        return Labels({uid: rules_banned(spec, u, config.categories) for uid, u in sampled.items()})
    if pc.labeller == "file":
        assert pc.labels_file is not None  # the config requires it
        return Labels(read_labels_file(pc.labels_file, sampled, config.categories))
    factory = request_factory(config, spec)
    keys = {uid: factory.key(uid, u) for uid, u in sampled.items()}
    banned_by_key = _cached_bans(cache, set(keys.values()))
    todo = {uid: u for uid, u in sampled.items() if keys[uid] not in banned_by_key}
    info = {"backend": config.llm.backend, **factory.llm_settings, "max_attempts": config.llm.max_attempts,
            "from_cache": len(sampled) - len(todo)}
    rejects: list[dict[str, Any]] = []
    if todo:
        log.info("labelling %d users with %s (%d already done)", len(todo), config.llm.model,
                 len(sampled) - len(todo))
        rejects, info["usage"] = _ask_llm(make_llm(), factory, todo, cache, banned_by_key)
    rejects.sort(key=lambda r: r["user_id"])
    banned = {uid: list(banned_by_key[keys[uid]]) for uid in sampled if keys[uid] in banned_by_key}
    return Labels(banned, rejects, info)


def request_factory(config: PipelineConfig, spec: DemographicsSpec) -> BanLabelRequestFactory:
    pc = config.profiles
    enforce = pc.rules == "enforce"
    template = load_template(pc.enforced_ban_template if enforce else pc.ban_template)
    return BanLabelRequestFactory(template, list(config.categories), reply_settings(config.llm),
                                  spec if enforce else None)


def _cached_bans(cache: ItemCache, keys: set[str]) -> dict[str, list[str]]:
    done = cache.read(keys=keys)
    return {} if done is None else dict(zip(done.column("item_key").to_pylist(), done.column("banned").to_pylist()))


def _ask_llm(backend: LLMBackend, factory: BanLabelRequestFactory, todo: dict[str, Demographics],
             cache: ItemCache, banned_by_key: dict[str, list[str]]) -> tuple[list[dict[str, Any]], Any]:
    """Label ``todo`` with the LLM, adding accepted answers to ``banned_by_key`` and the cache;
    returns (reject rows, the backend's usage)."""
    rejects = []
    with backend, cache.writer(flush_rows=16) as writer, \
            progress(total=len(todo), desc="banned categories", unit="user") as bar:
        for uid, result in label_with_llm(backend, factory, todo, lambda _r: bar.update()):
            if result.ok:
                ban = factory.banned(result.value, todo[uid])
                banned_by_key[result.key] = ban
                writer.add({"item_key": result.key, "user_id": uid, "banned": ban, "raw": result.raw,
                            "attempts": result.attempts, "seed": result.seed})
            else:
                rejects.append(reject_row(uid, result))
                if result.reason == "no_reply":
                    bar.update()
    return rejects, backend.usage()


def reject_row(uid: str, result: LLMResult) -> dict[str, Any]:
    return {"user_id": uid, "item_key": result.key, "reason": result.reason, "errors": list(result.errors),
            "raw": result.raw, "attempts": result.attempts}


@dataclass
class RuleAgreement:
    rule: str
    categories: list[str]
    allow_all: bool
    mandatory: bool
    applicable: int = 0
    satisfied: int = 0
    partly: int = 0
    category_bans: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rule": self.rule, "mandatory": self.mandatory, "applicable": self.applicable,
            "satisfied": self.satisfied,
            "satisfied_share": round(self.satisfied / self.applicable, 4) if self.applicable else None}
        if not self.allow_all:
            out["at_least_one_banned"] = self.partly
            # Per category: how many of the users it applies to ban it (a soft rule's decisions).
            out["category_bans"] = {c: self.category_bans.get(c, 0) for c in self.categories}
        return out


def rule_agreement(spec: DemographicsSpec, users: list[Demographics], banned: list[list[str]]) -> dict[str, Any]:
    """Per rule: users it applies to, how many answers satisfy it fully ("all its categories banned";
    "nothing banned" for the allow-all rule), how many ban at least one of its categories, and each
    category's count. Also: users who satisfy every mandatory rule that applies to them (hard-rule
    adherence), and bans that no applicable rule asked for."""
    rows = [RuleAgreement(r.rule, list(r.ban), r.allow_all, r.mandatory) for r in spec.ban_rules]
    unprompted = hard_applicable = hard_satisfied = 0
    for user, ban in zip(users, banned):
        asked: set[str] = set()
        hard = []
        for rule, row in zip(spec.ban_rules, rows):
            if not rule.applies_to(user):
                continue
            asked.update(rule.ban)
            row.applicable += 1
            ok = not ban if rule.allow_all else all(c in ban for c in rule.ban)
            row.satisfied += int(ok)
            if rule.mandatory:
                hard.append(ok)
            if not rule.allow_all:
                row.partly += int(any(c in ban for c in rule.ban))
                for c in rule.ban:
                    row.category_bans[c] = row.category_bans.get(c, 0) + int(c in ban)
        hard_applicable += int(bool(hard))
        hard_satisfied += int(bool(hard) and all(hard))
        unprompted += sum(1 for c in ban if c not in asked)
    return {"rules": [r.as_dict() for r in rows],
            "hard_rules": {"applicable": hard_applicable, "satisfied": hard_satisfied,
                           "satisfied_share": round(hard_satisfied / hard_applicable, 4) if hard_applicable else None},
            "unprompted_bans": unprompted, "published_rule1": PUBLISHED_RULE1}


def ban_statistics(banned: list[list[str]], categories: list[str]) -> dict[str, Any]:
    n = len(banned)
    rates = {c: round(sum(c in b for b in banned) / n, 4) if n else None for c in categories}
    return {
        "users": n,
        "ban_rate": rates,
        "published_ban_rate": {c: PUBLISHED_BAN_RATES.get(c) for c in categories},
        "mean_banned": round(sum(len(b) for b in banned) / n, 3) if n else None,
        "published_mean_banned": PUBLISHED_MEAN_BANNED,
        "ban_nothing": sum(1 for b in banned if not b),
        "published_ban_nothing": PUBLISHED_BAN_NOTHING,
    }
