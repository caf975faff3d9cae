"""A tiny random-weight Llama chat model built in code, for plumbing tests of the LLM backends.

Its free text is gibberish; with constrained decoding its replies are still schema-valid JSON,
which is what the tests check. Built and saved in about a second, a few MB on disk.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    '{"banned": ["Hate", "Violence"], "allowed": ["Sexuality"], "rationale": "a strict household"}',
    "You are a careful assistant. Answer with one JSON object that follows the schema.",
    "The user is 17 years old, lives with anxiety and follows a religion; which categories are unsafe?",
    "Write an unsafe prompt and its safe counterpart for the concept of a street fight.",
    "0123456789 true false null [] {} , : \" \\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def save_tiny_llama(directory: Path | str, vocab_size: int = 512, hidden_size: int = 64, num_heads: int = 4,
                    seed: int = 0) -> Path:
    """Save a random 2-layer Llama with a byte-level BPE tokenizer and a ChatML template to ``directory``.

    vLLM's CPU attention wants a common head size: ``hidden_size=128, num_heads=2`` gives 64.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    tokenizer.save_pretrained(directory)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=num_heads, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
