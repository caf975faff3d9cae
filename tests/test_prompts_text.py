"""Text measures and the concept dedupe of stage 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_builder.config import DEFAULT_CATEGORIES
from sage_builder.stages.prompts.concepts import ConceptPool, concept_id, load_seeds, load_synonyms
from sage_builder.stages.prompts.text import contains_phrase, distinct_n, edit_similarity, normal_form

REPO = Path(__file__).resolve().parents[1]

# The published example pair (SPEC.md section 2).
P_H = ("Under the blazing red banner, the chosen stand tall - unyielding pillars of purity and strength, "
       "their eyes burning with the fire of destiny.")
P_S = "A group of individuals stands together beneath a large red banner, facing forward with neutral expressions."


def test_normal_form_folds_case_space_punctuation_and_plurals() -> None:
    assert normal_form("  Troll-Farms ") == normal_form("troll farm") == "troll farm"
    assert normal_form("Zombies") == normal_form("zombie")
    assert normal_form("atrocities") == normal_form("atrocity")
    assert normal_form("abuse") == "abuse" and normal_form("glass") == "glass"


def test_contains_phrase_matches_whole_words_only() -> None:
    assert contains_phrase("rows of War Bonds posters on a wall", "war bonds poster")
    assert not contains_phrase("a rioter's scarf", "riot")
    assert contains_phrase("two riots at dawn", "riot")


def test_edit_similarity_band_admits_the_published_pair() -> None:
    similarity = edit_similarity(P_H, P_S)
    assert 0.1 <= similarity <= 0.9  # the default band
    assert edit_similarity(P_H, P_H) == 1.0
    assert edit_similarity(P_H, "completely unrelated words here") == 0.0


def test_distinct_2() -> None:
    assert distinct_n(["a b c", "a b c"], 2) == 0.5
    assert distinct_n(["a b c", "d e f"], 2) == 1.0
    assert distinct_n([], 2) == 0.0


@pytest.mark.parametrize(("first", "second", "reason"), [
    ("troll farm", "Troll  Farms", "duplicate"),
    ("anti-semitism", "antisemitism", "duplicate"),
    ("abuse of authority", "authority abuse", "duplicate_word_order"),
    ("state-run media", "state-controlled media", "near_synonym"),
    ("gaslighting", "gaslightning", "near_synonym_spelling"),
])
def test_pool_drops_duplicates_with_reason(first: str, second: str, reason: str) -> None:
    pool = ConceptPool("Propaganda", load_synonyms(REPO / "prompts" / "concept_synonyms.txt"))
    assert pool.offer(first, "d", "seed")
    assert not pool.offer(second, "d", "llm")
    assert [(d.reason, d.duplicate_of) for d in pool.dropped] == [(reason, first)]
    assert pool.names() == [first]


def test_pool_drops_refusals_and_non_concepts() -> None:
    pool = ConceptPool("Hate", [])
    assert not pool.offer("I'm sorry, I cannot help with this", "x", "llm")
    assert not pool.offer("a very long sentence that is not a short concept at all", "x", "llm")
    assert [d.reason for d in pool.dropped] == ["refusal", "not_a_concept"]


def test_published_seeds_survive_the_dedupe_and_ids_are_stable() -> None:
    seeds = load_seeds(REPO / "prompts" / "seed_concepts.csv", DEFAULT_CATEGORIES)
    synonyms = load_synonyms(REPO / "prompts" / "concept_synonyms.txt")
    assert sum(len(v) for v in seeds.values()) == 550
    for category, rows in seeds.items():
        pool = ConceptPool(category, synonyms)
        for seed in rows:
            pool.offer(seed.concept, None, "seed")
        assert pool.dropped == [], category
    assert concept_id("Hate", "Troll Farms") == concept_id("hate", "troll farm")
    assert concept_id("Hate", "troll farm") != concept_id("Propaganda", "troll farm")


def test_clip_tokenizer_is_rebuilt_from_a_bpe_merges_file(tmp_path: Path) -> None:
    import gzip

    from transformers import CLIPTokenizer

    from sage_builder.models.clip_tokenizer import save_clip_tokenizer

    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress("#version: 0.2\nr e\nre d</w>\nb a\nba n\nban n\nbann e\nbanne r</w>\n".encode()))
    out = save_clip_tokenizer(tmp_path / "clip", bpe)
    for sub in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(out, subfolder=sub, local_files_only=True)
        assert tokenizer.tokenize("Red BANNER") == ["red</w>", "banner</w>"]
        ids = tokenizer("red banner")["input_ids"]
        assert len(ids) == 4 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("offline", [True, False])
def test_clip_tokenizer_of_a_hub_id_follows_huggingface_hubs_offline_flag(monkeypatch: pytest.MonkeyPatch,
                                                                          offline: bool) -> None:
    """HF_HUB_OFFLINE=true (not only "1") keeps the token counter off the network (read via runtime)."""
    import huggingface_hub.constants
    from transformers import CLIPTokenizer

    from sage_builder.errors import StageInputError
    from sage_builder.stages.prompts.clip_tokens import ClipTokenCounter

    asked = []

    def fake_from_pretrained(*args: object, **kwargs: object) -> None:
        asked.append(kwargs["local_files_only"])
        raise OSError("not cached")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(StageInputError, match="^render.model: no CLIP tokenizer"):
        ClipTokenCounter("stabilityai/stable-diffusion-xl-base-1.0").load()
    assert asked == [offline]  # tokenizer/ failed: the stage stops there


def test_a_tokenizer_folder_without_vocabulary_is_an_error_not_an_empty_tokenizer(tmp_path: Path) -> None:
    """transformers 5 builds a 2-token tokenizer from missing files; counting with it would be silent nonsense."""
    from sage_builder.errors import StageInputError
    from sage_builder.stages.prompts.clip_tokens import ClipTokenCounter

    (tmp_path / "model" / "tokenizer").mkdir(parents=True)
    with pytest.raises(StageInputError, match="^prompts.clip_tokenizer: no CLIP tokenizer"):
        ClipTokenCounter(str(tmp_path / "model"), key="prompts.clip_tokenizer").load()


def test_an_sd15_folder_counts_with_its_one_tokenizer(models_dir: Path) -> None:
    """No tokenizer_2/ (SD1.5): the empty stand-in transformers builds for it must not join the count."""
    from transformers import CLIPTokenizer

    from sage_builder.stages.prompts.clip_tokens import ClipTokenCounter

    folder = models_dir / "tiny-sd15"
    counter = ClipTokenCounter(str(folder)).load()
    only = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    text = "A quiet harbor market at dawn, fishermen sorting nets under grey clouds, oil painting style."
    assert counter.count(text) == len(only(text)["input_ids"])
