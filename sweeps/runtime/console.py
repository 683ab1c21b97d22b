"""What a command prints: its own lines, and third-party warnings only with ``--verbose``.

Ray, Hugging Face and TransformerLens narrate their own set-up (Ray's token-authentication
warning, the hub's ``Retrying in 8s`` lines, ...). None of it changes what a sweep computes,
and every failure that matters reaches the user as one of our own ``error:`` lines, so by
default those libraries are turned down to errors. ``--verbose`` turns them back on.

Worker processes (Ray actors) inherit the environment variables set here, so the
libraries are as quiet there as in the driver.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Loggers of the libraries a sweep drives (the library root; their modules log below it).
THIRD_PARTY_LOGGERS = (
    "ray",
    "huggingface_hub",
    "transformers",
    "transformer_lens",
    "datasets",
    "filelock",
    "urllib3",
    "httpx",
    "httpcore",
    "wandb",
)

_verbose = False


def set_verbose(verbose: bool) -> None:
    """Third-party loggers at WARNING with ``verbose``, else at ERROR (in this process, and in
    the processes it starts, through ``TRANSFORMERS_VERBOSITY`` and ``HF_HUB_VERBOSITY``)."""
    global _verbose
    _verbose = verbose
    level = logging.WARNING if verbose else logging.ERROR
    name = "warning" if verbose else "error"
    os.environ["TRANSFORMERS_VERBOSITY"] = name
    os.environ["HF_HUB_VERBOSITY"] = name
    for logger in THIRD_PARTY_LOGGERS:
        logging.getLogger(logger).setLevel(level)


def verbose() -> bool:
    """Whether ``--verbose`` was given (third-party output shown)."""
    return _verbose


def library_level() -> int:
    """The log level third-party libraries run at (e.g. ``ray.init(logging_level=...)``)."""
    return logging.WARNING if _verbose else logging.ERROR


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    absolute = Path(path).absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def command(script: str | Path, *args: str) -> str:
    """A command line that reruns ``script`` with ``args`` in the interpreter running now
    (``.venv/bin/python sweeps/backup.py ...``), not a bare ``python``, which on a fresh
    machine is some other interpreter without this project's packages. ``script`` is a
    file (found from here wherever the user stands) or ``-m MODULE``."""
    head = [_shown(sys.executable)]
    head += str(script).split() if str(script).startswith("-m ") else [_shown(str(script))]
    return " ".join(shlex.quote(part) for part in [*head, *args])


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers, ``kill`` and ``ray stop`` send), raised where Ctrl-C raises
    ``KeyboardInterrupt``, so that both stop the same way: finished shards kept, workers
    stopped, the resume command printed."""


# Whether SIGTERM arrived: Ray turns any KeyboardInterrupt raised while it waits into a plain
# one, so the exception's type alone cannot tell SIGTERM from Ctrl-C after a Ray call.
_sigterm_received = False


def _terminate(signum, frame) -> None:
    global _sigterm_received
    _sigterm_received = True
    raise Terminated()


def terminated(interrupt: BaseException) -> bool:
    """Whether ``interrupt`` came from SIGTERM (else from Ctrl-C)."""
    return isinstance(interrupt, Terminated) or _sigterm_received


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread (elsewhere: no change).
    ``ray.init`` installs a handler of its own; ``executors.connect_ray`` puts this one back."""
    global _sigterm_received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm_received = False
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(interrupt: BaseException) -> int:
    """The shell's code for a command ended by a signal: 128 + SIGTERM's 15, or + SIGINT's 2."""
    return 128 + (signal.SIGTERM if terminated(interrupt) else signal.SIGINT)
