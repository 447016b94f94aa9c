"""The server's tokenizer: the artifact's ``tokenizer.json`` through the `tokenizers` library, and its
chat template rendered with jinja2 as transformers renders it.

Compile saves the tokenizer with transformers, and a server could load it back with AutoTokenizer, but
importing transformers and loading took 2.2 to 2.5 s of a 6.2 s start on 2 cores
(`benchmarks/cold_start.py`): once the forward process forks, the longest phase of a replica's start.
What a server asks of a tokenizer is small (encode, decode, the vocabulary, the end-of-sequence token,
the chat template), and transformers' fast tokenizers do the first four with this same library. The
chat template is rendered in transformers' own sandboxed environment and variables (transformers 5,
``utils/chat_template_utils.py``, ``_compile_jinja_template`` and ``apply_chat_template``):
``tests/test_tokenizer.py`` checks both against transformers. A tokenizer that needs more (a class
other than the generic fast one, clean-up of spaces, a template that uses transformers' own tags)
is loaded with transformers (`load_tokenizer`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# transformers' classes whose tokenizer is tokenizer.json and nothing else (transformers 5 saves
# "TokenizersBackend"; 4.x saved "PreTrainedTokenizerFast").
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TextTokenizer(Protocol):
    """What the engine and the server ask of a tokenizer: `PlainTokenizer`, or transformers' own."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def get_vocab(self) -> dict[str, int]: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False): ...


class PlainTokenizer:
    """The subset of transformers' tokenizer interface that the server uses."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any], chat_template: str | None):
        self._tokenizer = tokenizer
        self.special_tokens = {name: _content(config[name]) for name in SPECIAL_TOKENS if config.get(name)}
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = tokenizer.token_to_id(eos) if eos else None
        self._template = _environment().from_string(chat_template) if chat_template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """The conversation rendered and encoded without added special tokens, as transformers does."""
        if self._template is None:
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(directory: Path) -> TextTokenizer:
    """A `PlainTokenizer` when the saved tokenizer is plain, else transformers' AutoTokenizer."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = _chat_template(directory, config)
    plain = (
        (directory / "tokenizer.json").is_file()
        and config.get("tokenizer_class") in PLAIN_CLASSES
        and not config.get("clean_up_tokenization_spaces")
        and (template is None or isinstance(template, str))  # 4.x could save a list of named templates
    )
    if plain:
        try:
            return PlainTokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")), config, template)
        except jinja2.TemplateSyntaxError:  # a tag of transformers' own environment, such as {% generation %}
            pass
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """transformers 5 saves the template as chat_template.jinja, 4.x inside tokenizer_config.json."""
    path = directory / "chat_template.jinja"
    return path.read_text() if path.is_file() else config.get("chat_template")


def _content(token: str | dict) -> str:
    return token["content"] if isinstance(token, dict) else token


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """Unlike jinja2's own filter, no HTML escaping: a prompt is not a web page."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)
