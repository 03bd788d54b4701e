"""`--variant`: where config.json cannot tell models apart that compute different functions (Baichuan's 7B
models rotate, its 13B ones use ALiBi, with the same keys; Baichuan 2 normalises its head's rows at run time,
Baichuan 1 does not), the user names the model and qkvconv reads the flags that name stands for (the family's
`variants`, data) as if config.json held them. Without a name such a family is refused, never guessed.

The name travels as a context variable set around one command (`chosen_variant`), so every place that reads
a Hugging Face config.json (the format's reader, the weights of a base, an adapter's base) sees the same flags
without threading an argument through the registry's generic interfaces. A thread starts from an empty
context: the checks that run in threads start through `thread`, which carries the name along.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from pathlib import Path
from typing import Any

from qkvconv.formats.hf.config import with_variant
from qkvconv.io.config_files import read_json

_chosen: ContextVar[str | None] = ContextVar("qkvconv_variant", default=None)


@contextmanager
def chosen_variant(name: str | None) -> Iterator[None]:
    """Every Hugging Face config.json read inside reads as the model `name` (None: as it is)."""
    token = _chosen.set(name)
    try:
        yield
    finally:
        _chosen.reset(token)


def thread(target: Callable[..., Any], *args: Any) -> threading.Thread:
    """A started daemon thread running target(*args) in a copy of this context, so that it reads config.json
    with the command's --variant (a check in a bare thread would read a 13B Baichuan as a rotary 7B one)."""
    worker = threading.Thread(target=copy_context().run, args=(target, *args), name="qkvconv-check", daemon=True)
    worker.start()
    return worker


def read_config_json(path: Path) -> dict[str, Any]:
    """A Hugging Face config.json as the command's --variant reads it."""
    return with_variant(read_json(path), _chosen.get())
