"""The SageMaker container entry point: `<image> serve` starts the server.

SageMaker runs the image with the argument `serve`; flags after it are the server's flags (see
`--help`). Without arguments, or with flags only, it serves too. Any other command (`bash`, `python ...`)
is run in place of the server, so the image stays usable for debugging.

The model comes from /opt/ml/model (where SageMaker unpacks model artifacts; `GPT2SERVE_MODEL_DIR`
overrides the directory) when it holds a config.json, else `GPT2SERVE_MODEL`, else gpt2-xl from the Hub.
The port is SAGEMAKER_BIND_TO_PORT if set, else 8080; the host is 0.0.0.0 (as the SageMaker contract
requires; `gpt2serve serve` listens on 127.0.0.1 unless told otherwise), unless --host or GPT2SERVE_HOST
says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from gpt2serve import __version__
from gpt2serve.settings import Settings, add_arguments, settings_or_exit

CONTAINER_DEFAULTS = {"GPT2SERVE_HOST": "0.0.0.0"}  # SageMaker reaches the container from outside


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2serve-entrypoint",
        description="SageMaker container entry point for gpt2serve: `serve [flags]` runs the HTTP server.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2serve {__version__}")
    add_arguments(parser)
    return parser


def container_settings(argv: list[str], environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of `serve [flags]` in the container: the container's defaults under the environment."""
    environ = os.environ if environ is None else environ
    return settings_or_exit(build_parser().parse_args(argv), {**CONTAINER_DEFAULTS, **environ})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        os.execvp(argv[0], argv)  # not a server start: run the given command instead
    settings = container_settings(argv)
    from gpt2serve.api.app import serve  # after parsing: --help must not wait for torch to import

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
