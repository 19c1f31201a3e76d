"""Train a small byte-level BPE tokenizer offline, for generated checkpoints.

No model hub is reachable on build machines, so the tokenizer of a generated
checkpoint is trained here on text every Python install carries: the standard
library's own ``.py`` sources. Training is deterministic (sorted files, a fixed
byte cap, and BPE merge ties broken by the trainer in a fixed order).
"""

from __future__ import annotations

import functools
import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# In this order, so that their ids are 0, 1, 2 whatever the vocabulary size.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))

# A few MB trains in about a second and still fills a 16k vocabulary.
CORPUS_BYTES = 4_000_000

# ChatML, as Qwen-style chat models use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Install-specific (site-packages) or unrepresentative (code-page tables, test data) folders.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "encodings"})


def corpus_texts(limit: int = CORPUS_BYTES) -> list[str]:
    """The standard library's .py sources, in sorted path order, up to about ``limit`` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if _SKIPPED_DIRS.isdisjoint(p.relative_to(root).parts))
    texts: list[str] = []
    total = 0
    for path in files:
        if total >= limit:
            break
        text = path.read_bytes().decode("utf-8", errors="replace")
        texts.append(text)
        total += len(text)
    if not texts:
        raise RuntimeError(f"no Python sources found under {root} to train a tokenizer on")
    return texts


@functools.lru_cache(maxsize=4)
def _trained_json(vocab_size: int) -> str:
    # Cached as a string, so every caller gets a fresh Tokenizer it may mutate.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = corpus_texts()
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return tokenizer.to_str()


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """A deterministic byte-level BPE with at most ``vocab_size`` tokens, special tokens at ids 0..2."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (special tokens + 256 bytes), got {vocab_size}"
        )
    return Tokenizer.from_str(_trained_json(vocab_size))


def save_tokenizer_files(tokenizer: Tokenizer, out: Path, *, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into ``out``."""
    tokenizer.save(str(out / "tokenizer.json"))
    eos = SPECIAL_TOKENS[ENDOFTEXT_ID]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": eos,
        "add_bos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    # Generation stops at the end of a document or at the end of a chat turn.
    generation_config = {
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": [ENDOFTEXT_ID, IM_END_ID],
        "pad_token_id": ENDOFTEXT_ID,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "generation_config.json", generation_config)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
