"""The `gpt2serve` command: serve | generate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from gpt2serve import __version__

GENERATE_DEFAULT_MODEL = "random:gpt2"


def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of the API's request, with the API's defaults (shown, not duplicated)."""
    from gpt2serve.api.protocol import SeedRequest

    for name, field in SeedRequest.model_fields.items():
        if name in ("input", "stream"):
            continue
        flag = "--" + name.replace("_", "-")
        kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        kind = next((k for k in (int, float, str) if k in kinds), str)
        extra = {"action": "append"} if name == "stop" else {"type": kind}
        default = "" if field.default is None else f" (default {field.default})"
        help = f"{field.description or name}{default}"
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help, **extra)


def _generate(args: argparse.Namespace) -> int:
    from gpt2serve.api.protocol import SeedRequest
    from gpt2serve.engine.config import EngineConfig
    from gpt2serve.engine.engine import Engine
    from gpt2serve.engine.errors import GPT2ServeError

    given = {k: v for k, v in vars(args).items() if k in SeedRequest.model_fields}
    try:
        request = SeedRequest(input=args.text, **given)
        params = request.to_params()
        config = EngineConfig(device=args.device, dtype=args.dtype, max_batch_size=16, max_request_share=1.0)
        engine = Engine.load(args.model, config)
        engine.start()
        try:
            result = engine.generate_sync(args.text, params)
        finally:
            engine.stop()
    except GPT2ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts = request.answer(result)
    if args.json:
        print(json.dumps(texts, ensure_ascii=False, indent=2))
    else:
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- {i}")
            print(text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gpt2serve.settings import settings_or_exit

    settings = settings_or_exit(args)
    from gpt2serve.api.app import serve  # after the settings: a bad one must not wait for torch to import

    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2serve", description="A fast GPT-2 text-generation server.")
    parser.add_argument("--version", action="version", version=f"gpt2serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from gpt2serve.settings import add_arguments

    serve = sub.add_parser("serve", help="run the HTTP server (SageMaker, native and OpenAI-compatible APIs)")
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="generate text from a prompt and print it")
    gen.add_argument("text", help="the prompt")
    gen.add_argument(
        "--model",
        default=GENERATE_DEFAULT_MODEL,
        help=f"checkpoint dir, hub id or random:<size> (default {GENERATE_DEFAULT_MODEL})",
    )
    gen.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 | int8 (default: per device)"
    )
    gen.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    gen.add_argument("--json", action="store_true", help="print the API's JSON array")
    _add_request_flags(gen)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
