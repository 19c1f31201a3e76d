"""Train small tokenizers offline, for generated checkpoints.

No model hub is reachable on build machines, so the tokenizer of a generated
checkpoint is trained here on text every Python install carries: the standard
library's own ``.py`` sources. Training is deterministic (sorted files, a fixed
byte cap, and BPE merge ties broken by the trainer in a fixed order; one
SentencePiece trainer thread).

Two kinds, as the real families ship them: a byte-level BPE `tokenizer.json`
(Qwen, Mixtral, Llama-style), and for the Pangu releases a SentencePiece
`tokenizer.model` with their special tokens and chat format.
"""

from __future__ import annotations

import functools
import io
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


# ---- SentencePiece, as the Pangu releases ship their tokenizer -------------------------

# <unk>, <s>, </s> take ids 0, 1, 2; the user-defined symbols follow in order, so their ids are
# fixed whatever the vocabulary size. Pangu's turns are "[unused9]ROLE：...[unused10]", and
# [unused16] / [unused17] delimit thinking.
PANGU_SYMBOLS = tuple(f"[unused{i}]" for i in range(20))
PANGU_UNK_ID, PANGU_BOS_ID = 0, 1
PANGU_EOS_ID = 3 + PANGU_SYMBOLS.index("[unused10]")
PANGU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[unused9]系统：' + message['content'] + '[unused10]' }}"
    "{% elif message['role'] == 'user' %}{{ '[unused9]用户：' + message['content'] + '[unused10]' }}"
    "{% elif message['role'] == 'assistant' %}{{ '[unused9]助手：' + message['content'] + '[unused10]' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[unused9]助手：' }}{% endif %}"
)
SENTENCEPIECE_CORPUS_BYTES = 1_000_000


@functools.lru_cache(maxsize=4)
def train_sentencepiece(vocab_size: int) -> bytes:
    """A deterministic SentencePiece BPE model (the bytes of a tokenizer.model) of at most
    `vocab_size` pieces, with byte fallback and Pangu's symbols, trained line by line."""
    import sentencepiece as spm

    lines = [
        line
        for text in corpus_texts(SENTENCEPIECE_CORPUS_BYTES)
        for line in text.splitlines()
        if line.strip()
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not fill a large vocabulary
        byte_fallback=True,
        user_defined_symbols=list(PANGU_SYMBOLS),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def save_sentencepiece_files(model: bytes, out: Path, *, model_max_length: int) -> None:
    """Write tokenizer.model, tokenizer_config.json and generation_config.json as Pangu's releases
    do (no tokenizer.json)."""
    (out / "tokenizer.json").unlink(missing_ok=True)
    (out / "tokenizer.model").write_bytes(model)
    specials = {PANGU_UNK_ID: "<unk>", PANGU_BOS_ID: "<s>", 2: "</s>"} | {
        3 + i: symbol for i, symbol in enumerate(PANGU_SYMBOLS)
    }
    tokenizer_config = {
        "tokenizer_class": "PanguTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "bos_token": "<s>",
        "eos_token": "[unused10]",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "special": True,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
            }
            for i, content in specials.items()
        },
        "chat_template": PANGU_CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": PANGU_BOS_ID,
        "eos_token_id": PANGU_EOS_ID,
        "pad_token_id": PANGU_UNK_ID,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "generation_config.json", generation_config)
