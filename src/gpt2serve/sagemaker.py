"""`gpt2serve sagemaker package|deploy|status|delete|batch`: a gpt2serve image on SageMaker, with boto3.

- package: a Hugging Face checkpoint directory -> `model.tar.gz` (its files at the archive's root, which
  SageMaker unpacks into /opt/ml/model), uploaded to S3.
- deploy: a model, an endpoint config (one variant, `AllTraffic`) and an endpoint, all named `--name`;
  `--wait` follows the endpoint to InService; `--autoscale MIN:MAX` (which waits too) registers the variant
  with Application Auto Scaling and a target-tracking policy on SageMakerVariantInvocationsPerInstance.
- status: the endpoint, its variant, model and scaling, as JSON.
- delete: the scaling policy and target, the endpoint, its endpoint config and model.
- batch: a transform job over S3 JSON Lines (SplitType=Line, BatchStrategy=MultiRecord,
  application/jsonlines in and out, assembled by line).

Credentials, region and endpoint URLs are boto3's (`AWS_ENDPOINT_URL` included); what users get wrong
(no credentials, no region, a role that does not exist, a name already taken) stops the command with a
one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
INVOCATIONS_METRIC = "SageMakerVariantInvocationsPerInstance"
POLL_S = 15.0
JSONLINES = "application/jsonlines"
NO_CREDENTIALS = ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                  "AWS_PROFILE, or run `aws configure`")  # fmt: skip
NO_REGION = "no AWS region: pass --region, or set AWS_REGION (or AWS_DEFAULT_REGION)"


class SageMakerCommandError(Exception):
    """A mistake the user can fix; its message is printed as is."""


@contextmanager
def aws_errors() -> Iterator[None]:
    """botocore's exceptions as SageMakerCommandErrors that say what to do."""
    from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError

    try:
        yield
    except NoCredentialsError:
        raise SageMakerCommandError(NO_CREDENTIALS) from None
    except NoRegionError:
        raise SageMakerCommandError(NO_REGION) from None
    except ClientError as exc:
        error = exc.response.get("Error", {})
        message = f"{exc.operation_name}: {error.get('Code')}: {error.get('Message')}"
        raise SageMakerCommandError(message) from None


class SageMaker:
    """The boto3 clients of one region."""

    def __init__(self, region: str | None = None):
        import boto3

        session = boto3.session.Session(region_name=region)
        if session.get_credentials() is None:
            raise SageMakerCommandError(NO_CREDENTIALS)
        if not session.region_name:
            raise SageMakerCommandError(NO_REGION)
        self.session = session
        self.sm = session.client("sagemaker")

    def client(self, name: str) -> Any:
        return self.session.client(name)

    # -- package -----------------------------------------------------------------------------------
    def package(self, model_dir: str, s3_url: str) -> str:
        source = Path(model_dir)
        if not (source / "config.json").is_file():
            raise SageMakerCommandError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
        bucket, key = split_s3(s3_url)
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "model.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for path in sorted(p for p in source.rglob("*") if p.is_file()):
                    tar.add(path, arcname=str(path.relative_to(source)))
            self.client("s3").upload_file(str(archive), bucket, key)
        return s3_url

    # -- deploy ------------------------------------------------------------------------------------
    def check_role(self, role: str) -> None:
        """The role must exist: SageMaker's own error for a missing one comes only at endpoint creation."""
        from botocore.exceptions import ClientError

        if not role.startswith("arn:") or ":role/" not in role:
            message = f"--role must be an IAM role ARN (arn:aws:iam::<account>:role/<name>), got {role!r}"
            raise SageMakerCommandError(message)
        try:
            self.client("iam").get_role(RoleName=role.rsplit("/", 1)[1])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchEntity":
                raise SageMakerCommandError(
                    f"the role {role} does not exist; create it with a trust policy for "
                    "sagemaker.amazonaws.com (see the README's IAM section)") from None  # fmt: skip
            # no iam:GetRole permission: SageMaker checks the role itself

    def check_name_free(self, name: str) -> None:
        checks = (("describe_endpoint", "EndpointName", "an endpoint"),
                  ("describe_endpoint_config", "EndpointConfigName", "an endpoint config"),
                  ("describe_model", "ModelName", "a model"))  # fmt: skip
        for call, field, what in checks:
            if self._exists(call, **{field: name}):
                raise SageMakerCommandError(
                    f"{what} named {name!r} already exists; choose another --name or run "
                    f"`gpt2serve sagemaker delete --name {name}`")  # fmt: skip

    def _exists(self, call: str, **kwargs: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            getattr(self.sm, call)(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("ValidationException", "ResourceNotFound"):
                return False
            raise
        return True

    def deploy(self, args: argparse.Namespace) -> dict:
        self.check_role(args.role)
        self.check_name_free(args.name)
        container: dict[str, Any] = {"Image": args.image_uri, "Environment": dict(args.env)}
        if args.model_data:
            container["ModelDataUrl"] = args.model_data
        variant = {"VariantName": VARIANT, "ModelName": args.name, "InstanceType": args.instance_type,
                   "InitialInstanceCount": args.instance_count, "InitialVariantWeight": 1.0}  # fmt: skip
        self.sm.create_model(ModelName=args.name, PrimaryContainer=container, ExecutionRoleArn=args.role)
        try:
            self.sm.create_endpoint_config(EndpointConfigName=args.name, ProductionVariants=[variant])
            self.sm.create_endpoint(EndpointName=args.name, EndpointConfigName=args.name)
        except Exception:
            self.delete(args.name)  # no half-made deployment left behind to block the name
            raise
        if args.wait or args.autoscale:
            self.wait_for(args.name, "endpoint")
        if args.autoscale:
            low, high = args.autoscale
            self.autoscale(args.name, low, high, args.target_invocations)
        return self.status(args.name)

    def autoscale(self, name: str, low: int, high: int, target: float) -> None:
        aas = self.client("application-autoscaling")
        aas.register_scalable_target(**target_id(name), MinCapacity=low, MaxCapacity=high)
        config = {"TargetValue": float(target), "ScaleInCooldown": 300, "ScaleOutCooldown": 60,
                  "PredefinedMetricSpecification": {"PredefinedMetricType": INVOCATIONS_METRIC}}  # fmt: skip
        aas.put_scaling_policy(PolicyName=policy_name(name), PolicyType="TargetTrackingScaling",
                               TargetTrackingScalingPolicyConfiguration=config, **target_id(name))

    def wait_for(self, name: str, kind: str) -> dict:
        """Poll an endpoint (to InService) or a transform job (to Completed), showing its status."""
        from gpt2serve.sagemaker_wait import wait

        if kind == "endpoint":
            return wait(lambda: self.sm.describe_endpoint(EndpointName=name), "EndpointStatus",
                        "InService", f"endpoint {name}", POLL_S)  # fmt: skip
        return wait(lambda: self.sm.describe_transform_job(TransformJobName=name), "TransformJobStatus",
                    "Completed", f"transform job {name}", POLL_S)  # fmt: skip

    # -- status / delete ---------------------------------------------------------------------------
    def status(self, name: str) -> dict:
        endpoint = self.sm.describe_endpoint(EndpointName=name)
        config = self.sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
        variant = config["ProductionVariants"][0]
        model = self.sm.describe_model(ModelName=variant["ModelName"])
        running = {v["VariantName"]: v for v in endpoint.get("ProductionVariants", [])}.get(VARIANT, {})
        return {
            "endpoint": name, "status": endpoint["EndpointStatus"],
            "failure_reason": endpoint.get("FailureReason"), "endpoint_config": config["EndpointConfigName"],
            "model": model["ModelName"], "image": model["PrimaryContainer"]["Image"],
            "model_data": model["PrimaryContainer"].get("ModelDataUrl"), "role": model["ExecutionRoleArn"],
            "instance_type": variant["InstanceType"], "instance_count": variant["InitialInstanceCount"],
            "current_instance_count": running.get("CurrentInstanceCount"),
            "autoscaling": self.scaling(name),
        }  # fmt: skip

    def scaling(self, name: str) -> dict | None:
        aas = self.client("application-autoscaling")
        targets = scalable_targets(aas, name)
        if not targets:
            return None
        policies = aas.describe_scaling_policies(**target_id(name))["ScalingPolicies"]
        tracking = [(p["PolicyName"], p.get("TargetTrackingScalingPolicyConfiguration", {}))
                    for p in policies]  # fmt: skip
        return {
            "min": targets[0]["MinCapacity"], "max": targets[0]["MaxCapacity"],
            "policies": [{"name": n, "target_invocations": c.get("TargetValue"),
                          "metric": c.get("PredefinedMetricSpecification", {}).get("PredefinedMetricType")}
                         for n, c in tracking],
        }  # fmt: skip

    def delete(self, name: str) -> list[str]:
        """Delete everything `deploy` made under `name` that still exists; what was deleted."""
        deleted, aas = [], self.client("application-autoscaling")
        for policy in aas.describe_scaling_policies(**target_id(name))["ScalingPolicies"]:
            aas.delete_scaling_policy(PolicyName=policy["PolicyName"], **target_id(name))
            deleted.append(f"scaling policy {policy['PolicyName']}")
        if scalable_targets(aas, name):
            aas.deregister_scalable_target(**target_id(name))
            deleted.append(f"scalable target {resource_id(name)}")
        config_name, models = name, [name]
        if self._exists("describe_endpoint", EndpointName=name):
            config_name = self.sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
            self.sm.delete_endpoint(EndpointName=name)
            deleted.append(f"endpoint {name}")
        if self._exists("describe_endpoint_config", EndpointConfigName=config_name):
            config = self.sm.describe_endpoint_config(EndpointConfigName=config_name)
            models = sorted({v["ModelName"] for v in config["ProductionVariants"]} | {name})
            self.sm.delete_endpoint_config(EndpointConfigName=config_name)
            deleted.append(f"endpoint config {config_name}")
        for model in models:
            if self._exists("describe_model", ModelName=model):
                self.sm.delete_model(ModelName=model)
                deleted.append(f"model {model}")
        if not deleted:
            raise SageMakerCommandError(f"nothing named {name!r} to delete")
        return deleted

    # -- batch transform ---------------------------------------------------------------------------
    def batch(self, args: argparse.Namespace) -> dict:
        if self._exists("describe_transform_job", TransformJobName=args.name):
            raise SageMakerCommandError(f"a transform job named {args.name!r} already exists; job names are "
                                        "unique per account and region, choose another --name")  # fmt: skip
        self.sm.create_transform_job(
            TransformJobName=args.name, ModelName=args.model, BatchStrategy="MultiRecord",
            MaxConcurrentTransforms=args.max_concurrent_transforms, MaxPayloadInMB=args.max_payload_mb,
            TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": args.input}},
                            "ContentType": JSONLINES, "SplitType": "Line"},
            TransformOutput={"S3OutputPath": args.output, "Accept": JSONLINES, "AssembleWith": "Line"},
            TransformResources={"InstanceType": args.instance_type, "InstanceCount": args.instance_count},
        )  # fmt: skip
        job = self.wait_for(args.name, "job") if args.wait else {}
        described = job or self.sm.describe_transform_job(TransformJobName=args.name)
        return {"job": args.name, "status": described["TransformJobStatus"], "output": args.output}


def resource_id(name: str) -> str:
    return f"endpoint/{name}/variant/{VARIANT}"


def target_id(name: str) -> dict[str, str]:
    """The Application Auto Scaling target of the endpoint's variant."""
    return {"ServiceNamespace": "sagemaker", "ResourceId": resource_id(name),
            "ScalableDimension": SCALABLE_DIMENSION}  # fmt: skip


def scalable_targets(aas: Any, name: str) -> list[dict]:
    return aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource_id(name)],
                                         ScalableDimension=SCALABLE_DIMENSION)["ScalableTargets"]  # fmt: skip


def policy_name(name: str) -> str:
    return f"{name}-invocations-per-instance"


def split_s3(url: str) -> tuple[str, str]:
    if not url.startswith("s3://") or "/" not in url[5:] or url.endswith("/"):
        raise SageMakerCommandError(f"expected s3://bucket/key/model.tar.gz, got {url!r}")
    bucket, key = url[5:].split("/", 1)
    return bucket, key


def run(args: argparse.Namespace) -> int:
    """The `gpt2serve sagemaker` subcommands; exit status 2 on a user's mistake."""
    try:
        with aws_errors():
            aws = SageMaker(args.region)
            if args.action == "package":
                result: Any = {"model_data": aws.package(args.model_dir, args.s3_url)}
            elif args.action == "deploy":
                result = aws.deploy(args)
            elif args.action == "status":
                result = aws.status(args.name)
            elif args.action == "delete":
                result = {"deleted": aws.delete(args.name)}
            else:
                result = aws.batch(args)
    except SageMakerCommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
