"""One idiom for calling a runner in another process: the caller sends ``(method, args)``, the callee
runs ``getattr(target, method)(*args)`` and replies, until it receives None (as nano-vllm's
``ModelRunner.call``). The forward process uses it over a pipe, the tensor-parallel ranks over a
torch.distributed broadcast.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

Call = tuple[str, tuple]


def serve_calls(target: object, receive: Callable[[], Call | None], reply: Callable[[str, Any], None]) -> None:
    """Answer calls until `receive` gives None: ``reply("ok", result)`` or ``reply("error", error)``.
    A failed call leaves the loop serving: the error is the caller's to handle."""
    while (call := receive()) is not None:
        method, args = call
        try:
            result = getattr(target, method)(*args)
        except Exception as error:
            reply("error", transferable(error))
            continue
        reply("ok", result)


def transferable(error: Exception) -> Exception:
    """The error itself when it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
