"""Banned and allowed categories per user: asked of an LLM (``llm``) or derived from the authors'
four rules (``rules``), and how well the LLM's answers follow those rules.

The LLM sees the rules as prose (``prompts/ban_categories.txt``) and the user's six attributes as
JSON under the authors' column names; its reply must be ``{"forbidden": [<category>, ...]}`` with
categories drawn from the pipeline's list (a JSON-schema enum). A reply that is not that, after
``llm.max_attempts`` tries, is a reject: it is never read as "nothing banned".
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, create_model

from sage_builder.llm.base import LLMBackend, LLMRequest, LLMResult, reply_settings
from sage_builder.progress import progress
from sage_builder.stages.profiles.demographics import Demographics, DemographicsSpec
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


def ban_reply_schema(categories: list[str]) -> type[BaseModel]:
    """``{"forbidden": [...]}`` whose items are an enum of exactly the pipeline's categories."""
    category = enum.Enum("Category", {name: name for name in categories}, type=str)
    return create_model("BanReply", forbidden=(list[category], Field(  # type: ignore[valid-type]
        ..., max_length=len(categories), description="the categories this user must not be shown")))


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
    """Builds one LLM request per user; the key covers everything that determines the reply."""

    template: PromptTemplate
    categories: list[str]
    llm_settings: dict[str, Any]
    schema: type[BaseModel] = field(init=False)

    def __post_init__(self) -> None:
        self.schema = ban_reply_schema(self.categories)

    def key(self, uid: str, user: Demographics) -> str:
        # The user id is part of the key: two users with equal attributes are asked independently,
        # as the authors did, and get their own sampling seeds.
        return stable_hash("bans", uid, user.as_dict(), self.template.sha256, self.categories, self.llm_settings)

    def request(self, uid: str, user: Demographics) -> LLMRequest:
        messages = self.template.render(user=json.dumps(user.published(), ensure_ascii=False),
                                        categories=", ".join(self.categories))
        return LLMRequest(key=self.key(uid, user), messages=messages, schema=self.schema)


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
    if config.profiles.labeller == "rules":
        return Labels({uid: rules_banned(spec, u, config.categories) for uid, u in sampled.items()})
    factory = BanLabelRequestFactory(load_template(config.profiles.ban_template), list(config.categories),
                                     reply_settings(config.llm))
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
                ban = banned_from_reply(result.value, factory.categories)
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
    applicable: int = 0
    satisfied: int = 0
    partly: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = {"rule": self.rule, "applicable": self.applicable, "satisfied": self.satisfied,
               "satisfied_share": round(self.satisfied / self.applicable, 4) if self.applicable else None}
        if not self.allow_all:
            out["at_least_one_banned"] = self.partly
        return out


def rule_agreement(spec: DemographicsSpec, users: list[Demographics], banned: list[list[str]]) -> dict[str, Any]:
    """Per rule: users it applies to, how many answers satisfy it fully ("all its categories banned";
    "nothing banned" for the allow-all rule), and how many ban at least one of its categories.
    Also counts bans that no applicable rule asked for."""
    rows = [RuleAgreement(r.rule, list(r.ban), r.allow_all) for r in spec.ban_rules]
    unprompted = 0
    for user, ban in zip(users, banned):
        asked: set[str] = set()
        for rule, row in zip(spec.ban_rules, rows):
            if not rule.applies_to(user):
                continue
            asked.update(rule.ban)
            row.applicable += 1
            if rule.allow_all:
                row.satisfied += int(not ban)
                continue
            row.satisfied += int(all(c in ban for c in rule.ban))
            row.partly += int(any(c in ban for c in rule.ban))
        unprompted += sum(1 for c in ban if c not in asked)
    return {"rules": [r.as_dict() for r in rows], "unprompted_bans": unprompted,
            "published_rule1": PUBLISHED_RULE1}


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
