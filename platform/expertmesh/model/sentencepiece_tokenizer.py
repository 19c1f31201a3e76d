"""A SentencePiece `tokenizer.model` (as Pangu's releases ship it) behind the engine's tokenizer interface.

The engine speaks `tokenizers.Tokenizer` (`encode(...).ids`, `decode(ids, skip_special_tokens)`).
A SentencePiece model converts to one as `transformers`' converters do it: the same pieces
and ids, BPE merges recovered from the piece order (or the Unigram scores), SentencePiece's
normalisation (its precompiled character map, whitespace handling, the dummy `▁` prefix),
byte-fallback pieces `<0xNN>` that decode to bytes, control and user-defined symbols as
added tokens. `tokenizer_config.json` adds what the model file does not say: whether to add
BOS / EOS, and which added tokens are special.

The releases' own tokenizer is a slow `transformers` tokenizer over this model (`legacy`:
true): it cuts the text at added tokens and runs SentencePiece on each piece of text
between them, so each gets its own dummy-prefix space, and decoding drops that space again
per piece. `tokenizers` cuts at added tokens the same way when encoding; decoding per piece
is `SentencePieceTokenizer.decode`. Tests compare both with the `sentencepiece` library.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from expertmesh.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
UNIGRAM, BPE = 1, 2  # TrainerSpec.ModelType
SPACE = "\u2581"  # "▁", SentencePiece's visible space


def _read_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2  # the model file is this protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, or an unreadable file
        raise CheckpointError(f"{path}: not a SentencePiece model ({exc})") from exc
    if not proto.pieces:
        raise CheckpointError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def _bpe_merges(vocab: dict[str, int], mergeable: list[str]) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece BPE vocabulary: each piece is the merge of two
    pieces it splits into, in the order SentencePiece learned them (its piece order)."""
    merges: list[tuple[int, int, int, str, str]] = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _normalizer(proto) -> normalizers.Normalizer:
    spec = proto.normalizer_spec
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:  # nmt_nfkc and friends; the identity rule has none
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _added_tokens(proto, config: dict) -> list[AddedToken]:
    """Control and user-defined pieces, matched whole before the model runs (as SentencePiece
    matches user-defined symbols); special where tokenizer_config.json says so, else control
    pieces are special and user-defined ones are not."""
    declared = {
        entry["content"]: bool(entry.get("special", True))
        for entry in (config.get("added_tokens_decoder") or {}).values()
        if isinstance(entry, dict) and "content" in entry
    }
    added = []
    for piece in proto.pieces:
        if piece.type in (CONTROL, USER_DEFINED, UNKNOWN) or piece.piece in declared:
            special = declared.get(piece.piece, piece.type in (CONTROL, UNKNOWN))
            added.append(AddedToken(piece.piece, special=special, normalized=False))
    return added


class SentencePieceTokenizer:
    """A converted SentencePiece tokenizer: the `tokenizers.Tokenizer` for everything but
    `decode`, which decodes each run of text pieces on its own (see the module doc)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._added = {i: (t.content, t.special) for i, t in tokenizer.get_added_tokens_decoder().items()}

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            if token not in self._added:
                run.append(token)
                continue
            if run:
                parts.append(self._tokenizer.decode(run))
                run = []
            content, special = self._added[token]
            if not (special and skip_special_tokens):
                parts.append(content)
        if run:
            parts.append(self._tokenizer.decode(run))
        return "".join(parts)


def tokenizer_from_sentencepiece(model_file: Path, config: dict | None = None) -> SentencePieceTokenizer:
    """Convert `model_file` (a SentencePiece `tokenizer.model`), with `config` from
    tokenizer_config.json (`add_bos_token`, `add_eos_token`, `added_tokens_decoder`)."""
    config = config or {}
    proto = _read_proto(model_file)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    unk_id = next((i for i, p in enumerate(proto.pieces) if p.type == UNKNOWN), 0)
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    kind = proto.trainer_spec.model_type
    if kind == BPE:
        mergeable = [p.piece for p in proto.pieces if p.type == NORMAL]
        model = models.BPE(
            vocab,
            _bpe_merges(vocab, mergeable),
            unk_token=proto.pieces[unk_id].piece,
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    elif kind == UNIGRAM:
        model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        raise CheckpointError(
            f"{model_file}: SentencePiece model type {kind} is not supported (BPE or Unigram)"
        )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(proto)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:  # SentencePiece's decode drops the prefix's space
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_tokens(_added_tokens(proto, config))
    _post_processor(tokenizer, proto, config)
    return SentencePieceTokenizer(tokenizer)


def _post_processor(tokenizer: Tokenizer, proto, config: dict) -> None:
    """BOS / EOS around each encoded text, as tokenizer_config.json asks (BOS by default,
    as SentencePiece-era models such as Llama and Pangu add it)."""
    ends = []
    for flag, default, piece_id in (
        ("add_bos_token", True, proto.trainer_spec.bos_id),
        ("add_eos_token", False, proto.trainer_spec.eos_id),
    ):
        if config.get(flag, default) and 0 <= piece_id < len(proto.pieces):
            ends.append((proto.pieces[piece_id].piece, piece_id))
    if not ends:
        return
    bos = [e for e in ends if e[1] == proto.trainer_spec.bos_id]
    eos = [e for e in ends if e[1] == proto.trainer_spec.eos_id]
    single = " ".join([*(t for t, _ in bos), "$A", *(t for t, _ in eos)])
    pair = " ".join([single, *(t for t, _ in bos), "$B", *(t for t, _ in eos)])
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)


def load_sentencepiece(directory: Path) -> SentencePieceTokenizer:
    """`directory`'s tokenizer.model with its tokenizer_config.json, when it has one."""
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return tokenizer_from_sentencepiece(directory / "tokenizer.model", config)
