"""get_tokenizer()'s calls as vLLM and transformers code makes them: encode puts <|bos|>
first unless told not to, by nanochat's name or transformers', and the tokenizer is callable."""

import pytest

from microvllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(checkpoint_dir):
    return Tokenizer.find(checkpoint_dir)


def test_encode_puts_bos_first_by_default(tok):
    assert tok.encode("A") == [tok.bos_token_id, ord("A")]


def test_add_special_tokens_false_and_prepend_bos_false_leave_bos_out(tok):
    assert tok.encode("A", add_special_tokens=False) == tok.encode("A", prepend_bos=False) == [ord("A")]


def test_prepend_bos_and_add_special_tokens_that_disagree_are_refused(tok):
    with pytest.raises(ValueError, match="prepend_bos=False and add_special_tokens=True disagree"):
        tok.encode("A", prepend_bos=False, add_special_tokens=True)


def test_calling_the_tokenizer_gives_transformers_input_ids_and_attention_mask(tok):
    assert tok("AB") == {"input_ids": [tok.bos_token_id, 65, 66], "attention_mask": [1, 1, 1]}
    assert tok("AB", add_special_tokens=False)["input_ids"] == [65, 66]
    assert tok(["A", "BC"], add_special_tokens=False) == {"input_ids": [[65], [66, 67]],
                                                          "attention_mask": [[1], [1, 1]]}
