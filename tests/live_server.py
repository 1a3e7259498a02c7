"""A live server of the tiny model, for test modules outside tests/api (whose conftest has its own)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tests.api.conftest import ThreadServer, make_settings


@contextmanager
def tiny_server(checkpoint: Path) -> Iterator[ThreadServer]:
    """The real app on 127.0.0.1 serving `checkpoint`; torch on one thread meanwhile (see api_server)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = ThreadServer(make_settings(str(checkpoint))).start().wait_ready()
    try:
        yield server
    finally:
        server.stop()
        torch.set_num_threads(threads)
