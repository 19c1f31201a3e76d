"""A checkpoint's tokenizer files: the tokenizer itself and the ids that end generation."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from expertmesh.errors import CheckpointError
from expertmesh.model.sentencepiece_tokenizer import SentencePieceTokenizer, load_sentencepiece


def load_tokenizer(directory: Path) -> Tokenizer | SentencePieceTokenizer:
    """tokenizer.json where the checkpoint has one; else a SentencePiece tokenizer.model (with
    tokenizer_config.json), as the Pangu releases ship theirs."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        if (directory / "tokenizer.model").is_file():
            return load_sentencepiece(directory)
        raise CheckpointError(
            f"{directory}: neither tokenizer.json nor a SentencePiece tokenizer.model found "
            "(pass skip_tokenizer_init=True to use token ids)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from exc


def stop_token_ids(directory: Path, model_eos: tuple[int, ...]) -> set[int]:
    """EOS ids from generation_config.json when present (it may list several), else config.json."""
    path = directory / "generation_config.json"
    eos: set[int] = set(model_eos)
    if path.is_file():
        try:
            value = json.loads(path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if value is not None:
            eos = set(value) if isinstance(value, list) else {int(value)}
    return eos
