"""The `gpt2serve` command: serve | generate | batch | invoke | sagemaker."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from gpt2serve import __version__

GENERATE_DEFAULT_MODEL = "random:gpt2"
INVOKE_DEFAULT_URL = "http://127.0.0.1:8080"


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

    try:
        request = SeedRequest(input=args.text, **_request_params(args))
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
    _print_texts(request.answer(result), args.json)
    return 0


def _print_texts(texts: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(texts, ensure_ascii=False, indent=2))
        return
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- {i}")
        print(text)


def _request_params(args: argparse.Namespace) -> dict:
    """The request fields given on the command line."""
    from gpt2serve.api.protocol import SeedRequest

    return {k: v for k, v in vars(args).items() if k in SeedRequest.model_fields}


def _invoke(args: argparse.Namespace) -> int:
    from gpt2serve.client import Client, ClientError

    params = _request_params(args)
    try:
        if args.endpoint_name:
            client = Client.sagemaker(args.endpoint_name, region=args.region)
        else:
            client = Client(args.url)
        with client:
            if not args.stream:
                _print_texts(client.generate(args.text, **params), args.json)
                return 0
            for piece in client.stream(args.text, **params):
                print(piece, end="", flush=True)
            print()
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_invoke(sub: argparse._SubParsersAction) -> None:
    invoke = sub.add_parser("invoke", help="send a prompt to a running server or a SageMaker endpoint")
    invoke.add_argument("text", help="the prompt")
    where = invoke.add_mutually_exclusive_group()
    where.add_argument("--url", default=INVOKE_DEFAULT_URL, help=f"server URL (default {INVOKE_DEFAULT_URL})")
    endpoint_help = "a SageMaker endpoint, through boto3 (its credentials, region and AWS_ENDPOINT_URL)"
    where.add_argument("--endpoint-name", help=endpoint_help)
    invoke.add_argument("--region", default=None, help="the endpoint's AWS region (default: boto3's)")
    invoke.add_argument("--stream", action="store_true", help="print the text as it is made")
    invoke.add_argument("--json", action="store_true", help="print the API's JSON array")
    _add_request_flags(invoke)
    invoke.set_defaults(func=_invoke)


def _batch(args: argparse.Namespace) -> int:
    from gpt2serve.batch import BatchOptions, run_batch

    options = BatchOptions(
        input=args.input, output=args.output, model=args.model, url=args.url, concurrency=args.concurrency,
        device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size, threads=args.threads,
        ray=args.ray, replicas=args.replicas, ray_address=args.ray_address,
    )  # fmt: skip
    problem = _batch_ray_problem(options)
    if problem:
        print(f"gpt2serve batch: error: {problem}", file=sys.stderr)
        return 2
    return run_batch(options)


def _batch_ray_problem(options) -> str | None:
    """Why the batch's Ray flags do not go together, if they do not."""
    if (options.replicas is not None or options.ray_address) and not options.ray:
        return "--replicas and --ray-address need --ray"
    if options.ray and options.url:
        return "--ray runs its own engines; it does not take --url"
    if options.replicas is not None and options.replicas < 1:
        return f"--replicas must be at least 1, got {options.replicas}"
    return None


def _add_batch(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser(
        "batch", help="answer a JSON Lines file of requests, line for line (resumable)",
        description="Each input line is a request (seed API fields, an OpenAI-style {\"prompt\": ...}, or a "
        "JSON string); each output line its answer or error record, in input order. Rerun the same command "
        "to continue an interrupted job. Exit status: 0 all answered, 1 some lines failed, 2 stopped early.",
    )  # fmt: skip
    batch.add_argument("input", help="JSON Lines file of requests, or - for standard input")
    batch.add_argument("-o", "--output", required=True, help="output (resumed if it exists), - for stdout")
    where = batch.add_mutually_exclusive_group()
    model_help = f"run locally: checkpoint dir, hub id or random:<size> (default {GENERATE_DEFAULT_MODEL})"
    where.add_argument("--model", default=GENERATE_DEFAULT_MODEL, help=model_help)
    where.add_argument("--url", help="send the lines to this server (a base URL or an .../invocations path)")
    concurrency_help = "requests in flight (default: 2 x --max-batch-size locally and per --ray actor, " \
        "16 with --url)"  # fmt: skip
    batch.add_argument("--concurrency", type=int, default=None, help=concurrency_help)
    batch.add_argument("--max-batch-size", type=int, default=48, help="local engine: KV slots (default 48)")
    batch.add_argument("--dtype", default=None, help="local engine: float32 | bfloat16 | float16 | int8")
    batch.add_argument("--device", default="cpu", help="local engine: cpu | cuda | auto (default cpu)")
    batch.add_argument("--threads", type=int, default=None,
                       help="local engine: CPU threads (with --ray: per actor, default 1, each a CPU)")
    batch.add_argument("--ray", action="store_true",
                       help="spread the lines over engine actors on a Ray cluster (Ray Data; gpt2serve[ray])")
    batch.add_argument("--replicas", type=int, default=None, help="with --ray: engine actors (default 1)")
    batch.add_argument("--ray-address", default=None, help="with --ray: the cluster to join (`auto`, or "
                       "host:port of its head; default $RAY_ADDRESS, else a local instance for the job)")
    batch.set_defaults(func=_batch)


def _serve(args: argparse.Namespace) -> int:
    from gpt2serve.settings import settings_or_exit

    settings = settings_or_exit(args)
    problem = _ray_flags_problem(settings)
    if problem:
        print(f"gpt2serve serve: error: {problem}", file=sys.stderr)
        return 2
    if settings.ray:
        from gpt2serve.scale.serve import serve_ray  # ray is imported only here

        return serve_ray(settings)
    from gpt2serve.api.app import serve  # after the settings: a bad one must not wait for torch to import

    return serve(settings)


def _ray_flags_problem(settings) -> str | None:
    """Why the Ray flags given do not go together, if they do not."""
    flags = {"--replicas": settings.replicas, "--autoscale": settings.autoscale,
             "--target-ongoing-requests": settings.target_ongoing_requests}  # fmt: skip
    given = [flag for flag, value in flags.items() if value is not None]
    if given and not settings.ray:
        return f"{', '.join(given)} need --ray"
    if settings.replicas is not None and settings.autoscale is not None:
        return "give --replicas N or --autoscale MIN:MAX, not both"
    if settings.target_ongoing_requests is not None and settings.autoscale is None:
        return "--target-ongoing-requests needs --autoscale"
    return None


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
    _add_batch(sub)
    _add_invoke(sub)
    from gpt2serve.sagemaker_cli import add_sagemaker

    add_sagemaker(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
