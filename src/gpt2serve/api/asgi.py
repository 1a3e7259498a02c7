"""An application factory for running gpt2serve under an ASGI server's own command line, for example
uvicorn with TLS: `uvicorn --factory gpt2serve.api.asgi:create --ssl-keyfile k.pem --ssl-certfile c.pem`.

The settings come from the environment variables only (`GPT2SERVE_MODEL`, `GPT2SERVE_API_KEYS_FILE`,
...: see the README's settings table); host, port and TLS are the ASGI server's flags.
"""

from __future__ import annotations

from fastapi import FastAPI

from gpt2serve.api.app import configure_logging, create_app
from gpt2serve.settings import Settings


def create() -> FastAPI:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    return create_app(settings)
