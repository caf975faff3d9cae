"""The dataset card (``README.md``): YAML front matter the Hub and `datasets` read, and a body.

Generated parts of the body sit between ``<!-- sage-builder:begin NAME -->`` and
``<!-- sage-builder:end NAME -->`` markers. When a card already exists, only those blocks and the
generated front-matter keys are replaced; everything a person wrote around them is kept.
No sample image and no prompt text ever goes into the card (SPEC §7).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from sage_builder.public import public_data, public_text
from sage_builder.stages.label.dataset import hub_split

GENERATED_KEYS = ("license", "configs", "dataset_info", "sage_builder")
DEFAULT_TAGS = ["not-for-all-audiences", "personalized-safety", "text-to-image", "preference", "dpo"]
GATED_PROMPT = ("This dataset holds harmful prompts and images by design (hate, harassment, violence, self-harm, "
                "sexuality, shocking content, propaganda). Access is for research on personalized safety alignment "
                "of text-to-image models. By requesting access you agree not to use it to generate, share or rank "
                "harmful content, and not to redistribute it without these terms.")
GATED_FIELDS = {"Name": "text", "Affiliation": "text", "Intended use": "text",
                "I will use this dataset only for safety research and will not redistribute its images": "checkbox"}
CITATION = """@article{lei2025psa,
  title   = {Personalized Safety Alignment for Text-to-Image Diffusion Models},
  author  = {Lei and others},
  journal = {arXiv preprint arXiv:2508.01151},
  year    = {2025}
}"""
BLOCK = re.compile(r"<!-- sage-builder:begin (?P<name>[\w-]+) -->\n.*?<!-- sage-builder:end (?P=name) -->\n?",
                   re.DOTALL)


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a card; a card without front matter has an empty one."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            meta = yaml.safe_load(text[4:end]) or {}
            body = text[end + 4:].lstrip("\n")
            return (meta if isinstance(meta, dict) else {}), body
    return {}, text


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def front_matter(existing: dict[str, Any], *, license: str, pretty_name: str, configs: list[dict[str, Any]],
                 dataset_info: list[dict[str, Any]], sage_meta: dict[str, Any], n_records: int) -> dict[str, Any]:
    meta = dict(existing)
    meta["license"] = license
    meta.setdefault("pretty_name", pretty_name)
    meta["tags"] = list(dict.fromkeys(list(existing.get("tags") or []) + DEFAULT_TAGS))
    meta.setdefault("task_categories", ["text-to-image"])
    meta.setdefault("language", ["en"])
    meta["size_categories"] = [size_category(n_records)]
    meta["configs"] = configs
    meta["dataset_info"] = dataset_info
    meta["sage_builder"] = public_data(sage_meta)
    # The Hub shows these only on a gated repo (`sage publish --gated auto|manual`); a person's own wording is kept.
    meta.setdefault("extra_gated_prompt", GATED_PROMPT)
    meta.setdefault("extra_gated_fields", dict(GATED_FIELDS))
    return meta


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def generated_blocks(info: dict[str, Any]) -> dict[str, str]:
    """The card's generated sections from the figures the stage collected (``info``)."""
    splits = info["splits"]
    categories = info["categories"]
    counts = info["counts"]
    blocks: dict[str, str] = {}
    blocks["warning"] = (
        "> **Content warning.** This dataset is about harmful imagery (hate, harassment, violence, self-harm, "
        "sexuality, shocking content, propaganda). Its prompts and images are harmful by design. "
        "It holds no sample image in this card; open the data only where that is appropriate.\n")
    blocks["intended-use"] = (
        "## Intended use\n\n"
        "Research on personalized safety alignment of text-to-image models (PSA, arXiv 2508.01151): "
        "training and evaluating user-conditioned models that respect each simulated user's banned "
        "categories. Not for generating, sharing or ranking harmful content, and not a description of "
        "real people: users are simulated from demographic distributions.\n")
    blocks["structure"] = (
        "## Structure\n\n"
        "- `preferences` (default): one row per record. Each user gets "
        f"{info['pairs_per_category']} pairs per category; each pair gives two records, one captioned with the "
        "unsafe prompt (`caption_variant` u) and one with its safe rewrite (s). `chosen_variant` follows the rule: "
        "category banned for the user -> the safe image; allowed -> the image of the record's own caption.\n"
        "- `pairs`: one row per rendered pair, both prompts and both images (`image_unsafe`, `image_safe`), "
        "rendered from the same seed.\n"
        "- `users`: one row per simulated user, with attributes, banned/allowed categories, cluster, "
        "strictness level, split role and the user embedding.\n\n"
        f"Test splits use prompt index {info['test_index']}; train and validation use 1-{info['test_index'] - 1}. "
        "test_seen users are train users; validation and test_unseen users never appear in train. (The users "
        "config's `split` column calls the validation role `val`, as the psalign layout does.)\n")
    rows = [[hub_split(s), counts[s]["records"], counts[s]["users"], f"{counts[s]['chosen_safe_share']:.3f}",
             f"{counts[s]['pair_uses_min']}-{counts[s]['pair_uses_max']} (mean {counts[s]['pair_uses_mean']:.2f})",
             counts[s]["repeated_concepts"]] for s in splits]
    rows.append(["all", sum(counts[s]["records"] for s in splits), info["n_users_with_records"],
                 f"{info['chosen_safe_share']:.3f}", "", sum(counts[s]["repeated_concepts"] for s in splits)])
    cat_rows = [[c] + [counts[s]["per_category"].get(c, 0) for s in splits] for c in categories]
    blocks["counts"] = (
        "## Counts\n\n" + _table(["split", "records", "users", "chosen = safe", "users per pair (min-max)",
                                 "user-category hands repeating a concept"], rows)
        + "\n\nRecords per category:\n\n" + _table(["category"] + [hub_split(s) for s in splits], cat_rows)
        + f"\n\n`pairs`: {info['n_pairs']} rendered pairs. `users`: {info['n_users']} users "
        f"(embedding dimension {info['embedding_dim']}).\n")
    if info.get("ban_rates"):
        blocks["ban-rates"] = ban_rates_block(info["ban_rates"], categories)
    blocks["usage"] = usage_block(info["splits"])
    blocks["screening"] = screening_block(info.get("screening"))
    settings = info["settings"]
    setting_rows = [[k, f"`{public_text(str(v))}`"] for k, v in settings.items()]
    blocks["generation"] = "## Generation settings\n\n" + _table(["setting", "value"], setting_rows) + "\n"
    lineage = [[stage, f"`{m['content_hash']}`", f"`{m['fingerprint']}`"] for stage, m in info["lineage"].items()]
    blocks["lineage"] = (
        "## Lineage\n\nManifest hashes of the stages this dataset was built from (sage-builder run directory):\n\n"
        + _table(["stage", "manifest hash", "fingerprint"], lineage) + "\n")
    return {name: public_text(text) for name, text in blocks.items()}  # no local path leaves the machine


def ban_rates_block(rates: dict[str, Any], categories: list[str]) -> str:
    """Share of users banning each category, beside the published rates (SPEC 1.2) when known."""
    published = rates.get("published") or {}
    rows = [[c, f"{rates['rate'].get(c, 0.0):.0%} ({rates['count'].get(c, 0)})",
             f"{published[c]:.0%}" if published.get(c) is not None else "n/a"] for c in categories]
    return ("## Banned categories\n\n"
            f"Share of the {rates['users']} users with records who ban each category (published: the PSA "
            "authors' 1,000 users):\n\n" + _table(["category", "banned by", "published"], rows)
            + f"\n\nMean banned per user {rates['mean']:.2f}; {rates['nothing']} user(s) ban nothing.\n")


def usage_block(splits: list[str]) -> str:
    """How to load the three configs and join them, and the citation."""
    names = ", ".join(f"`{hub_split(s)}`" for s in splits)
    return ("## Loading and joining\n\n"
            f"Splits of `preferences`: {names}. `pairs` and `users` have one split, `train`.\n\n"
            "```python\n"
            "from datasets import load_dataset\n\n"
            "repo = \"ORG/NAME\"  # or a local copy of this folder\n"
            "records = load_dataset(repo, \"preferences\", split=\"train\")\n"
            "pairs = load_dataset(repo, \"pairs\", split=\"train\")  # both images of each pair\n"
            "users = load_dataset(repo, \"users\", split=\"train\")  # attributes, bans, embedding\n\n"
            "pair_row = {pid: i for i, pid in enumerate(pairs[\"pair_id\"])}\n"
            "user_row = {uid: i for i, uid in enumerate(users[\"user_id\"])}\n"
            "record = records[0]\n"
            "pair = pairs[pair_row[record[\"pair_id\"]]]    # join on pair_id\n"
            "user = users[user_row[record[\"user_id\"]]]    # join on user_id\n"
            "chosen = pair[\"image_safe\" if record[\"chosen_variant\"] == \"s\" else \"image_unsafe\"]\n"
            "rejected = pair[\"image_safe\" if record[\"rejected_variant\"] == \"s\" else \"image_unsafe\"]\n"
            "```\n\n"
            "`sage export --format pickapic` writes the records with both images inline (diffusers' Diffusion-DPO "
            "example), `--format psalign` the PSA authors' layout.\n\n"
            "## Citation\n\n```bibtex\n" + CITATION + "\n```\n")


def screening_block(screen: dict[str, Any] | None) -> str:
    """Screening rates per category (render.screen), or a plain statement that no image was screened."""
    if not screen:
        return ("## Screening\n\nScreening: not run (`render.screen.enabled` was false). No safety scorer "
                "checked that unsafe images show their concept or that safe images are harmless.\n")
    scorers = ", ".join(f"{name} (`{d.get('model')}`)" for name, d in screen.get("scorers", {}).items())
    notes = "".join(f"- {line}\n" for line in screen.get("not_run", []))
    act = screen["actions"]
    rows = []
    for category, c in {**screen["per_category"], "all": screen["totals"]}.items():
        n = c["pairs"] or 1
        rows.append([category, c["pairs"]] + [f"{c[o] / n:.0%} ({c[o]})" for o in
                                               ("ok", "safe_flagged", "unsafe_clean", "error")]
                    + [c["rerendered"], c["dropped"], c["kept"]])
    return ("## Screening\n\n"
            f"Both images of every pair were scored by {scorers}; an image counts as flagged when any of them flags "
            "it. Outcomes at the first render: `ok` (unsafe image flagged, safe image clean), `safe_flagged` (the "
            "safe image is flagged), `unsafe_clean` (nothing flagged), `error` (a scorer could not judge an image). "
            f"Actions: safe_flagged -> {act['safe_flagged']}, unsafe_clean -> {act['unsafe_clean']}, error -> "
            f"{act['error']}, at most {act['max_attempts']} renders per pair. Classifiers see harassment and "
            "propaganda poorly: unsafe_clean there says little about the image.\n\n" + notes + ("\n" if notes else "")
            + _table(["category", "pairs", "ok", "safe_flagged", "unsafe_clean", "error", "rerendered", "dropped",
                      "kept"], rows) + "\n")


def render_card(existing_text: str | None, meta: dict[str, Any], blocks: dict[str, str], title: str) -> str:
    old_meta, body = split_card(existing_text or "")
    meta = front_matter(old_meta, **meta)
    wrapped = {name: f"<!-- sage-builder:begin {name} -->\n{text.rstrip()}\n<!-- sage-builder:end {name} -->\n"
               for name, text in blocks.items()}
    if not body.strip():
        body = f"# {meta.get('pretty_name', title)}\n\n"
    present = {m.group("name") for m in BLOCK.finditer(body)}
    body = BLOCK.sub(lambda m: wrapped.get(m.group("name"), m.group(0)), body)
    missing = [wrapped[name] for name in blocks if name not in present]
    if missing:
        body = body.rstrip("\n") + "\n\n" + "\n".join(missing)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=120)
    return f"---\n{front}---\n\n{body.rstrip()}\n"
