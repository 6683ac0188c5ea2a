"""Bundled GPT-2 BPE (offline) and the char-level tokenizer."""

import pytest

import jaxlm
from jaxlm.tokenizer import from_spec


def test_gpt2_known_ids_offline():
    tok = jaxlm.get_tokenizer("gpt2")
    assert tok.encode("Hello, how are you?") == [15496, 11, 703, 389, 345, 30]
    assert tok.encode("<|endoftext|>") == [50256] == [tok.eot_id]
    assert tok.encode(" world") == [995]
    assert tok.vocab_size == 50257
    text = "Ünïcödé — and emoji 🙂 and\nnew lines  "
    assert tok.decode(tok.encode(text)) == text
    assert from_spec(tok.to_spec()).encode("Hello") == [15496]


def test_tinyshakespeare_token_count():
    from importlib import resources

    text = (resources.files("jaxlm") / "assets" / "tinyshakespeare.txt").read_text()
    ids = jaxlm.get_tokenizer("gpt2").encode(text)
    assert len(ids) == 338025 and ids[:4] == [5962, 22307, 25, 198]


def test_char_tokenizer_round_trip_and_spec():
    tok = jaxlm.get_tokenizer("char", text="hello world\n")
    assert tok.vocab_size == len(set("hello world\n"))
    assert tok.decode(tok.encode("low hero")) == "low hero"
    again = from_spec(tok.to_spec())
    assert again.encode("hello") == tok.encode("hello") and again.chars == tok.chars
    with pytest.raises(jaxlm.JaxlmError, match=r"characters 'xz' are not in"):
        tok.encode("hex zero")


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="needs text"):
        jaxlm.get_tokenizer("char")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        jaxlm.get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        from_spec({"kind": "bpe"})
