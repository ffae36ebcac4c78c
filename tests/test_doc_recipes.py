"""The code recipes in docs/ run as written (only the model swapped for a tiny checkpoint)
and give what they say they give."""

import re
from pathlib import Path

from checkpoints import load_reference
from reference import reference_logits

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_block_after(doc: Path, heading_text: str) -> str:
    text = doc.read_text()
    start = text.index(heading_text)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_categorical_eval_recipe_answers_the_letter_with_the_largest_logit(make_checkpoint):
    checkpoint = make_checkpoint(seq_len=128)
    recipe = python_block_after(DOCS / "nanochat.md", "Categorical evals")
    recipe, swapped = re.subn(r'LLM\("[^"]*"\)', f"LLM({str(checkpoint)!r})", recipe)
    assert swapped == 1
    scope: dict = {}
    exec(recipe, scope)

    sd, cfg = load_reference(checkpoint)
    logits = reference_logits(sd, cfg, "E", scope["prompt"])[-1]
    letter_ids = [ord(letter) for letter in scope["letters"]]  # the byte tokenizer's ids
    expected = scope["letters"][int(logits[letter_ids].argmax())]
    assert scope["answer"] == expected
    assert scope["prompt"][0] == scope["tok"].bos_token_id and scope["prompt"].count(scope["tok"].bos_token_id) == 1
