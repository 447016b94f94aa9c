"""The server's tokenizer against transformers' on the same saved files: the same ids, text and chat prompts."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from neuron_serve.engine.tokenizer import PlainTokenizer, load_tokenizer
from neuron_serve.weights.tiny import TRAINING_TEXT

TEXTS = [
    "The capital of France is",
    TRAINING_TEXT[:300],
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Grüße 日本語 🙂 <|im_end|> a control token written by a user",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome"},
        {"role": "user", "content": "And of Spain? 🙂"},
    ],
]


@pytest.fixture(scope="module", params=["tiny", "default"])
def saved(request, tmp_path_factory, tiny_dir):
    """A tokenizer directory as compile writes it (transformers' save_pretrained), per model."""
    if request.param == "tiny":
        return tiny_dir
    directory = tmp_path_factory.mktemp("default-tokenizer")
    request.getfixturevalue("default_loaded").tokenizer.save_pretrained(directory)
    return directory


def test_a_saved_fast_tokenizer_loads_without_transformers(saved):
    assert isinstance(load_tokenizer(saved), PlainTokenizer)


def test_ids_text_vocabulary_and_chat_prompts_match_transformers(saved):
    ours, theirs = load_tokenizer(saved), AutoTokenizer.from_pretrained(saved)
    assert ours.eos_token_id == theirs.eos_token_id is not None
    assert ours.get_vocab() == theirs.get_vocab()
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            expected = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt)
            expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected


def test_a_template_that_raises_is_an_error_naming_its_message(tiny_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    strict = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user') }}{% endif %}"
    )
    (tmp_path / "chat_template.jinja").write_text(strict + "{{ messages[0]['content'] | tojson }}")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.decode(tokenizer.apply_chat_template([{"role": "user", "content": "é<b>"}])) == '"é<b>"'
    with pytest.raises(Exception, match="the first message must be the user"):
        tokenizer.apply_chat_template([{"role": "system", "content": "hi"}])


def test_a_tokenizer_that_needs_transformers_is_loaded_with_it(tiny_dir, tmp_path):
    for name in ("tokenizer.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    assert not isinstance(load_tokenizer(tmp_path), PlainTokenizer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{% generation %}{{ messages[0]['content'] }}{% endgeneration %}")
    assert not isinstance(load_tokenizer(tmp_path), PlainTokenizer)
    (tmp_path / "chat_template.jinja").unlink()  # transformers 4.x: named templates in the config
    named = [{"name": "default", "template": (tiny_dir / "chat_template.jinja").read_text()}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    tokenizer = load_tokenizer(tmp_path)
    assert not isinstance(tokenizer, PlainTokenizer) and tokenizer.eos_token_id is not None
