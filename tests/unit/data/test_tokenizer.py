"""The byte-level BPE tokenizer (data/tokenizer.py): a lossless round trip on any text, single-id special
tokens, a saved tokenizer that loads and checks the vocabulary, and a corpus too small for the vocabulary.
"""

from __future__ import annotations

import pytest

from gptoss_cli.data.corpus import load_documents
from gptoss_cli.data.tokenizer import EOS, PAD, check_vocab, load_tokenizer, tokenizer_hash, train_tokenizer
from gptoss_cli.errors import GptossError


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii text",
        "  leading spaces and trailing  ",
        "multiple     spaces\tand\ttabs\t\t",
        "line one\nline two\n\n\nafter blank lines\r\nwindows line\n",
        "caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m fa\u00e7ade",
        "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3068\u4e2d\u6587\u5b57\u7b26",
        "emoji \U0001f600\U0001f680 family \U0001f468\u200d\U0001f469\u200d\U0001f467 flag \U0001f1e9\U0001f1ea",
        "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947",
        "\x00control\x07chars\x1b[0m and \u00a0nbsp",
        "",
    ],
)
def test_round_trip_is_lossless(builtin_tok, text):
    assert builtin_tok.decode(builtin_tok.encode(text).ids) == text


def test_token_bytes_join_to_the_texts_utf8(builtin_tok):
    """Each token's bytes (read from its byte-level spelling, so a token holding part of a character has
    its own bytes, which decode() cannot show) join to exactly the text's UTF-8; a special token is its text;
    the byte-level alphabet is the one `tokenizers` uses."""
    from tokenizers import pre_tokenizers

    from gptoss_cli.data.tokenizer import BYTE_LEVEL, token_bytes

    assert set(BYTE_LEVEL) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(BYTE_LEVEL.values()) == list(
        range(256)
    )
    text = "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 <|endoftext|> plain"
    ids = builtin_tok.encode(text).ids
    pieces = [token_bytes(builtin_tok, i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(not _is_utf8(p) for p in pieces)  # some token holds part of a character
    assert token_bytes(builtin_tok, builtin_tok.token_to_id(EOS)) == EOS.encode()


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_special_tokens_are_single_ids(builtin_tok):
    eos, pad = builtin_tok.token_to_id(EOS), builtin_tok.token_to_id(PAD)
    assert eos is not None and pad is not None and eos != pad
    assert builtin_tok.encode(EOS).ids == [eos] and builtin_tok.encode(PAD).ids == [pad]
    ids = builtin_tok.encode(f"one{EOS}two").ids
    assert ids.count(eos) == 1
    assert builtin_tok.decode(ids, skip_special_tokens=False) == f"one{EOS}two"


def test_saved_tokenizer_loads_and_checks_the_vocabulary(builtin_tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    builtin_tok.save(str(path))
    loaded = load_tokenizer(path)
    assert tokenizer_hash(loaded) == tokenizer_hash(builtin_tok)
    assert loaded.encode("expert").ids == builtin_tok.encode("expert").ids
    check_vocab(loaded, 400, str(path))
    with pytest.raises(GptossError, match="tokenizer has 400 tokens but model.vocab_size is 399"):
        check_vocab(loaded, 399, str(path))
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(GptossError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_tiny_corpus_fills_fewer_tokens_than_asked_and_prepare_warns_once(
    small_cfg, small_corpus, tmp_path, capsys, torch_one_thread
):
    docs = load_documents([str(small_corpus)])
    small = train_tokenizer(docs, 5000)
    assert 258 < small.get_vocab_size() < 5000  # 256 bytes + 2 specials, then the merges the text supports

    from gptoss_cli.train.loop import setup_training

    capsys.readouterr()
    p = setup_training(small_cfg(f"data.paths={small_corpus}", "model.vocab_size=5000"), tmp_path / "run")
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap the line
    assert err.count("warning:") == 1
    filled = load_tokenizer(tmp_path / "run" / "tokenizer.json").get_vocab_size()
    assert f"the corpus fills only {filled} of 5000 vocabulary entries" in err
    assert filled < 5000 and p.model.embedding.weight.shape[0] == 5000  # the model keeps model.vocab_size
