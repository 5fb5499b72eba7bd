"""The token stream and its batches (data/batches.py): every document ends with EOS, the stream is cached by
tokenizer hash and documents (a damaged entry is rebuilt), and TokenBatches are next-token windows.
"""

from __future__ import annotations

import pytest
import torch

from gptoss_cli.data.batches import TokenBatches, tokenize_stream
from gptoss_cli.data.tokenizer import EOS, tokenizer_hash

DOCS = ["The router picks two experts per token.", "Sliding windows keep the cache small.",
        "Attention sinks absorb probability mass.", "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u65e5\u672c\u8a9e."]


class ExplodingTokenizer:
    """Delegates to a real tokenizer but fails if anything is encoded: proves a cache hit."""

    def __init__(self, inner):
        self.inner = inner

    def token_to_id(self, token):
        return self.inner.token_to_id(token)

    def encode_batch(self, docs):
        raise AssertionError("encode_batch called: the token cache was not used")


def test_token_stream_ends_each_document_with_eos_and_is_cached(builtin_tok, isolated_cache):
    h = tokenizer_hash(builtin_tok)
    stream = tokenize_stream(DOCS, builtin_tok, h)
    eos = builtin_tok.token_to_id(EOS)
    assert stream.dtype == torch.int32 and int(stream[-1]) == eos
    assert (stream == eos).sum().item() == len(DOCS)
    expected = [i for d in DOCS for i in [*builtin_tok.encode(d).ids, eos]]
    assert stream.tolist() == expected
    assert len(list((isolated_cache / "tokens").glob("*.safetensors"))) == 1

    again = tokenize_stream(DOCS, ExplodingTokenizer(builtin_tok), h)
    assert torch.equal(again, stream)
    with pytest.raises(AssertionError, match="not used"):  # the key includes the tokenizer ...
        tokenize_stream(DOCS, ExplodingTokenizer(builtin_tok), "another-tokenizer")
    with pytest.raises(AssertionError, match="not used"):  # ... and the documents
        tokenize_stream(DOCS[:-1], ExplodingTokenizer(builtin_tok), h)


def test_damaged_cache_entry_is_rebuilt(builtin_tok, isolated_cache):
    h = tokenizer_hash(builtin_tok)
    stream = tokenize_stream(DOCS, builtin_tok, h)
    (entry,) = (isolated_cache / "tokens").glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    assert torch.equal(tokenize_stream(DOCS, builtin_tok, h), stream)
    assert torch.equal(tokenize_stream(DOCS, ExplodingTokenizer(builtin_tok), h), stream)  # rewritten


def test_token_batches_are_next_token_windows():
    stream = torch.arange(50, dtype=torch.int32)
    data = TokenBatches(stream, seq_len=4, batch_size=3, seed=0)
    assert (data.num_samples, data.batches_per_epoch) == (12, 4)
    inputs, targets = data.batch(epoch=0, index=1)
    assert inputs.shape == targets.shape == (3, 4) and inputs.dtype == torch.int64
    assert torch.equal(targets, inputs + 1) and all(int(row[0]) % 4 == 0 for row in inputs)
    assert torch.equal(data.batch(0, 1)[0], inputs)  # a pure function of (seed, epoch, index)
    seen = torch.cat([data.batch(0, i)[0][:, 0] for i in range(4)])
    assert sorted(seen.tolist()) == list(range(0, 48, 4))  # one epoch visits every window once
    assert not torch.equal(torch.cat([data.batch(1, i)[0] for i in range(4)]),
                           torch.cat([data.batch(0, i)[0] for i in range(4)]))
