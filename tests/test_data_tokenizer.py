"""Documents and the tokenizer: what a document is (.txt paragraphs, .jsonl `text`), directories and
globs, the built-in corpus, the sample order of TokenBatches, and the byte-level BPE tokenizer (lossless
round trip, single-id special tokens, small corpora). Every input format is in test_data_formats.py, the
prepared shards in test_data_prepare.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptoss_cli.data.batches import TokenBatches, permute
from gptoss_cli.data.corpus import load_documents
from gptoss_cli.data.tokenizer import EOS, PAD, check_vocab, load_tokenizer, tokenizer_hash, train_tokenizer
from gptoss_cli.errors import GptossError

DOCS = ["The router picks two experts per token.", "Sliding windows keep the cache small.",
        "Attention sinks absorb probability mass.", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u65e5\u672c\u8a9e."]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(load_documents([]), 400)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- documents ------------------------------------------------------------------------------------

def test_txt_documents_are_split_at_blank_lines(tmp_path):
    path = write(tmp_path / "a.txt", "first line\nsame doc\n\n\n  second, indented\n   \n\t\nthird\tdoc\n")
    assert load_documents([str(path)]) == ["first line\nsame doc", "  second, indented", "third\tdoc"]
    one = write(tmp_path / "one.txt", "no blank lines\nat all")
    assert load_documents([str(one)]) == ["no blank lines\nat all"]


def test_jsonl_text_field(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"text": "one", "id": 1}) + "\n\n"
                 + json.dumps({"text": "two\n\nstill two"}) + "\n" + json.dumps({"text": "   "}) + "\n")
    assert load_documents([str(path)]) == ["one", "two\n\nstill two"]  # no paragraph split, blank text skipped


@pytest.mark.parametrize(("line", "problem"), [
    ({"body": "no text field"}, "expected an object with a string 'text' field"),
    ({"text": 3}, "expected an object with a string 'text' field"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "invalid JSON"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, problem):
    bad = line if isinstance(line, str) else json.dumps(line)
    path = write(tmp_path / "d.jsonl", json.dumps({"text": "fine"}) + "\n\n" + bad + "\n")
    with pytest.raises(GptossError) as info:
        load_documents([str(path)])
    assert str(info.value).startswith(f"{path}:3: {problem}")


def test_directories_and_globs_are_sorted_and_recursive(tmp_path):
    root = tmp_path / "data"
    write(root / "b.txt", "b1\n\nb2")
    write(root / "a.jsonl", json.dumps({"text": "a1"}) + "\n")
    write(root / "sub" / "c.txt", "c1")
    write(root / "sub" / "deeper" / "d.jsonl", json.dumps({"text": "d1"}) + "\n")
    write(root / "notes.md", "m1")
    write(root / "image.png", "not text")
    assert load_documents([str(root)]) == ["a1", "b1", "b2", "m1", "c1", "d1"]
    assert load_documents([str(root / "**" / "*.txt")]) == ["b1", "b2", "c1"]
    assert load_documents([str(root / "*.jsonl")]) == ["a1"]
    # Several specs: in the order given.
    assert load_documents([str(root / "sub"), str(root / "b.txt")]) == ["c1", "d1", "b1", "b2"]


def test_bad_paths(tmp_path):
    write(tmp_path / "only" / "image.png", "x")
    cases = {
        str(tmp_path / "missing.txt"): "does not exist",
        str(tmp_path / "only"): "holds no readable files (.txt, .md, .jsonl",
        str(tmp_path / "only" / "image.png"): "is not a readable kind of file",
        str(tmp_path / "*.none"): "matches no readable files",
    }
    for spec, problem in cases.items():
        with pytest.raises(GptossError, match="data.paths: ") as info:
            load_documents([spec])
        assert problem in str(info.value) and spec in str(info.value)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(GptossError, match="not UTF-8 text"):
        load_documents([str(latin1)])


def test_builtin_corpus():
    docs = load_documents([])
    assert len(docs) >= 100 and all(d.strip() for d in docs)
    assert load_documents([]) == docs


# ---- the sample order ---------------------------------------------------------------------------

def test_token_batches_are_next_token_windows():
    stream = np.arange(50, dtype=np.uint16)
    data = TokenBatches([stream[:13], stream[13:31], stream[31:]], seq_len=4, batch_size=3, seed=0)  # 3 shards
    assert (data.num_samples, data.batches_per_epoch) == (12, 4)
    inputs, targets = data.batch(epoch=0, index=1)
    assert inputs.shape == targets.shape == (3, 4) and inputs.dtype == torch.int64
    assert torch.equal(targets, inputs + 1) and all(int(row[0]) % 4 == 0 for row in inputs)
    assert torch.equal(data.batch(0, 1)[0], inputs)  # a pure function of (seed, epoch, index)
    seen = torch.cat([data.batch(0, i)[0][:, 0] for i in range(4)])
    assert sorted(seen.tolist()) == list(range(0, 48, 4))  # one epoch visits every window once
    assert not torch.equal(torch.cat([data.batch(1, i)[0] for i in range(4)]),
                           torch.cat([data.batch(0, i)[0] for i in range(4)]))
    # Each rank draws its own rows of the global batch.
    halves = TokenBatches([stream], seq_len=4, batch_size=4, seed=3)
    whole = halves.batch(2, 1)[0]
    assert torch.equal(torch.cat([halves.batch(2, 1, rank=r, world=2)[0] for r in (0, 1)]), whole)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection_for_every_size(n):
    order = permute(np.arange(n), n, seed=11, epoch=2)
    assert sorted(order.tolist()) == list(range(n))
    if n > 7:
        assert order.tolist() != list(range(n)) and not np.array_equal(order, permute(np.arange(n), n, 11, 3))


def test_validation_sample_is_fixed_and_spread():
    data = TokenBatches([np.arange(1001, dtype=np.uint32)], seq_len=10, batch_size=4, seed=0)
    batches = data.eval_batches(2)
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10)]
    starts = [int(row[0]) for b in batches for row in b[0]]
    assert starts == sorted(set(starts)) and starts[0] == 0 and starts[-1] >= 800  # spread over the split
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, data.eval_batches(2), strict=True))
    assert len(data.eval_batches(100)) == 25  # all 100 samples when fewer than asked


# ---- the tokenizer --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
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
])
def test_round_trip_is_lossless(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


def test_special_tokens_are_single_ids(tok):
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    assert eos is not None and pad is not None and eos != pad
    assert tok.encode(EOS).ids == [eos] and tok.encode(PAD).ids == [pad]
    ids = tok.encode(f"one{EOS}two").ids
    assert ids.count(eos) == 1
    assert tok.decode(ids, skip_special_tokens=False) == f"one{EOS}two"


def test_saved_tokenizer_loads_and_checks_the_vocabulary(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    assert tokenizer_hash(loaded) == tokenizer_hash(tok) and loaded.encode("expert").ids == tok.encode("expert").ids
    check_vocab(loaded, 400, str(path))
    with pytest.raises(GptossError, match="tokenizer has 400 tokens but model.vocab_size is 399"):
        check_vocab(loaded, 399, str(path))
    write(tmp_path / "bad.json", "{}")
    with pytest.raises(GptossError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_tiny_corpus_fills_fewer_tokens_than_asked_and_prepare_warns_once(small_cfg, small_corpus, tmp_path,
                                                                            capsys, torch_one_thread):
    docs = load_documents([str(small_corpus)])
    small = train_tokenizer(docs, 5000)
    assert 258 < small.get_vocab_size() < 5000  # 256 bytes + 2 specials, then the merges the text supports

    from gptoss_cli.train.loop import prepare

    capsys.readouterr()
    p = prepare(small_cfg(f"data.paths={small_corpus}", "model.vocab_size=5000"), tmp_path / "run")
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap the line
    assert err.count("warning:") == 1
    filled = load_tokenizer(tmp_path / "run" / "tokenizer.json").get_vocab_size()
    assert f"the corpus fills only {filled} of 5000 vocabulary entries" in err
    assert filled < 5000 and p.model.embedding.weight.shape[0] == 5000  # the model keeps model.vocab_size
