"""SentencePiece `tokenizer.model` files (the Pangu releases' tokenizer) against `sentencepiece` itself.

Each model is trained here by the `sentencepiece` library (no hub), BPE and Unigram, with byte
fallback and Pangu's user-defined symbols. The reference is the releases' own tokenizer as
`transformers` runs it (a slow tokenizer over the model, `legacy`: true), written out here on
the library: cut the text at the added tokens, `sentencepiece` on each piece of text between
them; decode each run of text pieces with `sentencepiece`, added tokens as themselves.
"""

import pytest
import sentencepiece as spm

from expertmesh import LLM, SamplingParams
from expertmesh.api.chat_template import ChatTemplate
from expertmesh.engine.detokenizer import Detokenizer
from expertmesh.engine.sampling_params import SamplingParams as Params
from expertmesh.engine.sequence import Sequence
from expertmesh.model.sentencepiece_tokenizer import tokenizer_from_sentencepiece
from expertmesh.model.tokenizer_files import load_tokenizer
from expertmesh.model.tokenizer_training import corpus_texts

PANGU_SYMBOLS = ["[unused9]", "[unused10]", "[unused16]", "[unused17]"]
TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Hello world",
    " leading space and  two  spaces, trailing ",
    "用户：你好，世界！[unused10]",  # CJK through byte fallback
    "emoji 🙂 and ünïcödé",
    "[unused9]用户：写一个函数[unused10][unused9]助手：",
    "tabs\tand\nnewlines\n\n",
    "",
]


def segments(text: str) -> list[str]:
    """`text` cut at the added tokens, the tokens kept."""
    out, rest = [], text
    while rest:
        found = [(rest.find(s), s) for s in PANGU_SYMBOLS if s in rest]
        if not found:
            return [*out, rest]
        at, symbol = min(found)
        out += [part for part in (rest[:at], symbol) if part]
        rest = rest[at + len(symbol) :]
    return out


def reference_encode(processor, text: str) -> list[int]:
    ids = []
    for part in segments(text):
        ids += [processor.piece_to_id(part)] if part in PANGU_SYMBOLS else processor.encode(part)
    return ids


def reference_decode(processor, ids: list[int], skip: tuple[str, ...] = ()) -> str:
    symbols = {processor.piece_to_id(s): s for s in PANGU_SYMBOLS}
    parts, run = [], []
    for i in [*ids, None]:
        if i in symbols or i is None:
            parts.append(processor.decode(run))
            run = []
            if i is not None and symbols[i] not in skip:
                parts.append(symbols[i])
        else:
            run.append(i)
    return "".join(parts)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(corpus_texts(400_000)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        model_type=request.param,
        vocab_size=1200,
        byte_fallback=True,
        user_defined_symbols=PANGU_SYMBOLS,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")), out / "tokenizer.model"


def test_ids_and_text_match_sentencepiece(trained):
    processor, model_file = trained
    ours = tokenizer_from_sentencepiece(model_file, {"add_bos_token": False})
    for text in TEXTS:
        want = reference_encode(processor, text)
        assert ours.encode(text).ids == want, text
        assert ours.decode(want, skip_special_tokens=False) == reference_decode(processor, want) == text, text
    # without added tokens, that is the library's own encoding
    assert ours.encode(TEXTS[0]).ids == processor.encode(TEXTS[0])
    assert ours.get_vocab_size() == processor.get_piece_size()


def test_bos_follows_tokenizer_config(trained):
    processor, model_file = trained
    text = "Hello world"
    with_bos = tokenizer_from_sentencepiece(model_file, {"add_bos_token": True}).encode(text).ids
    assert with_bos == [processor.bos_id(), *processor.encode(text)]
    no_bos = tokenizer_from_sentencepiece(model_file, {"add_bos_token": False}).encode(text).ids
    assert no_bos == processor.encode(text)


def test_user_defined_symbols_are_one_token_and_special_where_the_config_says(trained):
    processor, model_file = trained
    config = {"added_tokens_decoder": {"1001": {"content": "[unused10]", "special": True}}}
    ours = tokenizer_from_sentencepiece(model_file, config)
    ids = ours.encode("你好[unused10]", add_special_tokens=False).ids
    assert ids[-1] == processor.piece_to_id("[unused10]")
    assert ours.decode(ids, skip_special_tokens=True) == "你好"
    assert ours.decode(ids, skip_special_tokens=False) == "你好[unused10]"


def test_streaming_gives_the_text_of_the_whole_and_keeps_the_space_before_a_word(trained):
    # Byte-fallback pieces form one character only together: nothing is streamed half-made.
    # The first output token's "▁" is a real space after the prompt, not a prefix to drop.
    processor, model_file = trained
    config = {
        "add_bos_token": False,
        "added_tokens_decoder": {"0": {"content": "[unused10]", "special": True}},
    }
    detokenizer = Detokenizer(tokenizer_from_sentencepiece(model_file, config))
    prompt = processor.encode("print(")
    for text in TEXTS:
        output = reference_encode(processor, text)
        seq = Sequence("r", None, prompt, Params(max_tokens=len(output) + 1), None)
        pieces = []
        for token in output:
            seq.output_token_ids.append(token)
            piece = detokenizer.append_token(seq)
            assert "\ufffd" not in piece
            pieces.append(piece)
        whole = reference_decode(processor, prompt + output, skip=("[unused10]",))
        want = whole[len(reference_decode(processor, prompt)) :]
        assert "".join(pieces) == seq.text == want, text


def test_a_pangu_checkpoint_brings_its_tokenizer_model_chat_format_and_eos(tiny_checkpoint):
    # as the release: tokenizer.model and tokenizer_config.json, no tokenizer.json
    ckpt = tiny_checkpoint("pangu_embedded")
    assert (ckpt / "tokenizer.model").is_file() and not (ckpt / "tokenizer.json").exists()
    processor = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    tokenizer = load_tokenizer(ckpt)
    assert tokenizer.encode("def f(x):").ids == [processor.bos_id(), *processor.encode("def f(x):")]
    messages = [{"role": "system", "content": "简洁"}, {"role": "user", "content": "写一个函数"}]
    rendered = ChatTemplate.from_checkpoint(ckpt).render(messages)
    assert rendered == "[unused9]系统：简洁[unused10][unused9]用户：写一个函数[unused10][unused9]助手："
    eos = processor.piece_to_id("[unused10]")
    assert tokenizer.encode(rendered).ids.count(eos) == 2
    llm = LLM(ckpt, show_progress=False)
    assert llm.engine.eos_token_ids == {eos}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    (out,) = llm.generate([rendered], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and "\ufffd" not in out.outputs[0].text
