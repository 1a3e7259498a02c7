"""The arguments of `gpt2serve sagemaker ...` (the commands are in gpt2serve.sagemaker)."""

from __future__ import annotations

import argparse


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _min_max(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        pair = int(low), int(high)
    except ValueError:
        pair = (0, -1)
    if not sep or pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX instance counts (1 <= MIN <= MAX), got {text!r}")
    return pair


def _run(args: argparse.Namespace) -> int:
    from gpt2serve.sagemaker import run

    if args.action == "deploy" and args.autoscale and args.target_invocations is None:
        args.parser.error("--autoscale needs --target-invocations (invocations per instance per minute)")
    return run(args)


def add_sagemaker(sub: argparse._SubParsersAction) -> None:
    sm = sub.add_parser("sagemaker", help="package, deploy, inspect, delete and batch on SageMaker (boto3)")
    actions = sm.add_subparsers(dest="action", required=True)
    region = argparse.ArgumentParser(add_help=False)
    region.add_argument("--region", help="AWS region (default: boto3's, from AWS_REGION or the profile)")

    package = actions.add_parser("package", parents=[region], help="checkpoint dir -> model.tar.gz on S3")
    package.add_argument("model_dir", help="a Hugging Face checkpoint directory (config.json, weights)")
    package.add_argument("s3_url", help="where to upload it: s3://bucket/key/model.tar.gz")

    deploy = actions.add_parser("deploy", parents=[region], help="create model, endpoint config and endpoint")
    deploy.add_argument("--name", required=True, help="the name of the model, endpoint config and endpoint")
    deploy.add_argument("--image-uri", required=True, help="the gpt2serve image in ECR")
    deploy.add_argument("--role", required=True, help="execution role ARN SageMaker assumes")
    deploy.add_argument("--model-data", help="s3://.../model.tar.gz (from `package`)")
    deploy.add_argument("--instance-type", default="ml.m5.4xlarge", help="default ml.m5.4xlarge")
    deploy.add_argument("--instance-count", type=int, default=1, help="default 1")
    deploy.add_argument("--autoscale", type=_min_max, metavar="MIN:MAX",
                        help="scale between MIN and MAX instances (waits for InService first)")
    deploy.add_argument("--target-invocations", type=float,
                        help="with --autoscale: target invocations per instance per minute")
    deploy.add_argument("--env", type=_env_pair, action="append", default=[], metavar="K=V",
                        help="container environment variable (repeatable), e.g. GPT2SERVE_DTYPE=int8")
    deploy.add_argument("--wait", action="store_true", help="wait until the endpoint is InService")
    deploy.set_defaults(parser=deploy)

    for action, text in (("status", "the endpoint, its model and scaling, as JSON"),
                         ("delete", "delete the endpoint, its config, model and scaling")):  # fmt: skip
        p = actions.add_parser(action, parents=[region], help=text)
        p.add_argument("--name", required=True, help="the endpoint's name")

    batch = actions.add_parser("batch", parents=[region], help="a batch transform job over JSON Lines on S3")
    batch.add_argument("--name", required=True, help="the transform job's name")
    batch.add_argument("--model", required=True, help="a SageMaker model (as `deploy` made it)")
    batch.add_argument("--input", required=True, help="s3:// prefix of JSON Lines files")
    batch.add_argument("--output", required=True, help="s3:// prefix for the answers (<file>.out)")
    batch.add_argument("--instance-type", default="ml.m5.4xlarge", help="default ml.m5.4xlarge")
    batch.add_argument("--instance-count", type=int, default=1, help="default 1")
    batch.add_argument("--max-concurrent-transforms", type=int, default=4, help="requests per instance (4)")
    batch.add_argument("--max-payload-mb", type=int, default=6, help="largest mini-batch in MB (6)")
    batch.add_argument("--wait", action="store_true", help="wait until the job has completed")
    sm.set_defaults(func=_run)
