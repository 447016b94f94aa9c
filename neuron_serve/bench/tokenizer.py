"""Tokenizers that build prompts of an exact token length: a local Hugging Face one, or the server's own.

Both answer the same three questions: the token ids of a text (without special tokens), the text of some
ids, and how many tokens the server adds around a prompt (a BOS token, a chat template), so that the
prompt the server sees has exactly the length asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import requests


class BenchError(RuntimeError):
    """A problem with the benchmark's setup that the user must fix; the CLI prints it without a traceback."""


class BenchTokenizer(Protocol):
    name: str
    max_model_len: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def prompt_overhead(self, endpoint: str) -> int | None: ...  # None: not known


class HFTokenizer:
    """A Hugging Face tokenizer directory, such as ``ARTIFACTS/tokenizer/``."""

    def __init__(self, path: str | Path):
        # transformers takes seconds to import: only pay for it when a local tokenizer is asked for.
        from transformers import AutoTokenizer

        self.name = str(path)
        self.max_model_len: int | None = None
        # local_files_only: nothing is ever fetched from a model hub, even for a name that looks like one.
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: "word ." must stay "word ." or it re-tokenizes to a different length.
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def prompt_overhead(self, endpoint: str) -> int:
        probe = "Hello"
        bare = len(self.encode(probe))
        if endpoint == "completions":
            return len(self._tok.encode(probe, add_special_tokens=True)) - bare
        if not getattr(self._tok, "chat_template", None):
            return 0
        # Servers render the template to text, then tokenize it without adding special tokens again.
        text = self._tok.apply_chat_template(
            [{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True
        )
        return len(self.encode(text)) - bare


class ServerTokenizer:
    """The server's vLLM-compatible ``POST /tokenize`` and ``POST /detokenize`` routes."""

    def __init__(self, root_url: str, model: str, timeout_s: float = 30.0):
        self.name = f"{root_url}/tokenize"
        self._root = root_url
        self._model = model
        self._timeout = timeout_s
        self._session = requests.Session()
        # The empty prompt tells what the server puts in front of every prompt (a BOS token or nothing);
        # it is stripped from encode() whether or not the server honours add_special_tokens=false.
        with_special, self.max_model_len = self._tokenize("", add_special_tokens=True)
        self._prefix, _ = self._tokenize("", add_special_tokens=False)
        self._overhead = len(with_special)

    def _tokenize(self, text: str, add_special_tokens: bool) -> tuple[list[int], int | None]:
        body = {"model": self._model, "prompt": text, "add_special_tokens": add_special_tokens}
        resp = self._session.post(f"{self._root}/tokenize", json=body, timeout=self._timeout)
        resp.raise_for_status()
        data = resp.json()
        return list(data["tokens"]), data.get("max_model_len")

    def encode(self, text: str) -> list[int]:
        ids, _ = self._tokenize(text, add_special_tokens=False)
        n = len(self._prefix)
        return ids[n:] if n and ids[:n] == self._prefix else ids

    def decode(self, ids: list[int]) -> str:
        body = {"model": self._model, "tokens": ids}
        resp = self._session.post(f"{self._root}/detokenize", json=body, timeout=self._timeout)
        resp.raise_for_status()
        return resp.json()["prompt"]

    def prompt_overhead(self, endpoint: str) -> int | None:
        # /tokenize does not show the chat template, so its length is unknown here.
        return self._overhead if endpoint == "completions" else None


def load_tokenizer(path: str | None, root_url: str, model: str) -> BenchTokenizer:
    """The local tokenizer at ``path`` when given, else the server's; a clear error when neither works."""
    if path:
        if not Path(path).is_dir():
            raise BenchError(f"--tokenizer {path}: no such directory (expected e.g. ARTIFACTS/tokenizer)")
        try:
            return HFTokenizer(path)
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot load the tokenizer at {path}: {exc}") from exc
    try:
        return ServerTokenizer(root_url, model)
    except (requests.RequestException, KeyError, ValueError) as exc:
        raise BenchError(
            f"no --tokenizer given and the server at {root_url} has no usable /tokenize and /detokenize "
            f"routes ({exc}); pass --tokenizer DIR (a Hugging Face tokenizer directory, e.g. "
            "ARTIFACTS/tokenizer) or use --dataset FILE.jsonl"
        ) from exc
