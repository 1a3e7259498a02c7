"""gpt2serve: a fast GPT-2 text-generation server.

`from gpt2serve import Client` loads only the client (httpx); the server and the engine (torch) load
when their modules are imported.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "ClientError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gpt2serve import client

        return getattr(client, name)
    raise AttributeError(f"module 'gpt2serve' has no attribute {name!r}")
