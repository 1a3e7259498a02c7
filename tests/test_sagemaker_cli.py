"""`gpt2serve sagemaker ...` against moto in server mode: real boto3, real HTTP on 127.0.0.1."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from gpt2serve import sagemaker
from gpt2serve.cli import main
from tests.api.conftest import free_port

moto_server = pytest.importorskip("moto.server")

REGION = "us-east-1"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/gpt2serve:latest"
TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole",
}]}  # fmt: skip


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> boto3.session.Session:
    """boto3 pointed at moto through AWS_ENDPOINT_URL, with test credentials; a session to inspect it."""
    for key, value in {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sagemaker, "POLL_S", 0.05)
    return boto3.session.Session(region_name=REGION)


@pytest.fixture
def role(aws: boto3.session.Session) -> str:
    iam = aws.client("iam")
    try:
        return iam.get_role(RoleName="gpt2serve-sagemaker")["Role"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        document = json.dumps(TRUST)
        created = iam.create_role(RoleName="gpt2serve-sagemaker", AssumeRolePolicyDocument=document)
        return created["Role"]["Arn"]


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict | None, str]:
    """Run `gpt2serve sagemaker ...`; (status, its JSON output, its standard error)."""
    status = main(["sagemaker", *args])
    out = capsys.readouterr()
    return status, json.loads(out.out) if out.out.strip() else None, out.err


def test_package_uploads_the_checkpoint_at_the_archive_root(aws, capsys, tiny_checkpoint: Path):
    aws.client("s3").create_bucket(Bucket="models")
    status, out, err = cli(capsys, "package", str(tiny_checkpoint), "s3://models/gpt2/model.tar.gz")
    assert status == 0, err
    assert out == {"model_data": "s3://models/gpt2/model.tar.gz"}
    blob = aws.client("s3").get_object(Bucket="models", Key="gpt2/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = sorted(tar.getnames())
    assert names == sorted(p.name for p in tiny_checkpoint.iterdir() if p.is_file())
    assert "config.json" in names


def test_deploy_status_delete(aws, role, capsys):
    sm, aas = aws.client("sagemaker"), aws.client("application-autoscaling")
    status, out, err = cli(capsys, "deploy", "--name", "gpt-2", "--image-uri", IMAGE, "--role", role,
                           "--model-data", "s3://models/gpt2/model.tar.gz", "--instance-type",
                           "ml.c5.4xlarge", "--instance-count", "2", "--env", "GPT2SERVE_DTYPE=int8",
                           "--autoscale", "2:5", "--target-invocations", "120")  # fmt: skip
    assert status == 0, err
    model = sm.describe_model(ModelName="gpt-2")
    assert model["PrimaryContainer"]["Image"] == IMAGE and model["ExecutionRoleArn"] == role
    assert model["PrimaryContainer"]["ModelDataUrl"] == "s3://models/gpt2/model.tar.gz"
    assert model["PrimaryContainer"]["Environment"] == {"GPT2SERVE_DTYPE": "int8"}
    variant = sm.describe_endpoint_config(EndpointConfigName="gpt-2")["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"], variant["ModelName"]) == (
        "ml.c5.4xlarge", 2, "gpt-2")
    assert sm.describe_endpoint(EndpointName="gpt-2")["EndpointConfigName"] == "gpt-2"
    target = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in target] == [
        ("endpoint/gpt-2/variant/AllTraffic", 2, 5)]
    policy = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"][0]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling" and tracking["TargetValue"] == 120
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == sagemaker.INVOCATIONS_METRIC
    assert out["status"] == "InService" and out["autoscaling"]["min"] == 2

    status, shown, _ = cli(capsys, "status", "--name", "gpt-2")
    assert status == 0 and shown["instance_type"] == "ml.c5.4xlarge" and shown["instance_count"] == 2
    assert shown["autoscaling"]["policies"][0]["target_invocations"] == 120

    status, _, err = cli(capsys, "deploy", "--name", "gpt-2", "--image-uri", IMAGE, "--role", role)
    assert status == 2 and "already exists" in err and "delete --name gpt-2" in err

    status, out, err = cli(capsys, "delete", "--name", "gpt-2")
    assert status == 0, err
    assert len(out["deleted"]) == 5  # policy, target, endpoint, endpoint config, model
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    status, _, err = cli(capsys, "delete", "--name", "gpt-2")
    assert status == 2 and "nothing named 'gpt-2'" in err


def test_batch_transform_job(aws, role, capsys):
    sm = aws.client("sagemaker")
    sm.create_model(ModelName="gpt-2-batch", ExecutionRoleArn=role, PrimaryContainer={"Image": IMAGE})
    args = ["batch", "--name", "prompts-1", "--model", "gpt-2-batch", "--input", "s3://data/prompts/",
            "--output", "s3://data/answers/", "--instance-type", "ml.m5.2xlarge", "--instance-count", "3"]
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    job = sm.describe_transform_job(TransformJobName="prompts-1")
    assert job["ModelName"] == "gpt-2-batch" and job["BatchStrategy"] == "MultiRecord"
    assert job["TransformInput"]["SplitType"] == "Line"
    assert job["TransformInput"]["ContentType"] == "application/jsonlines"
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://data/prompts/"
    assert job["TransformOutput"]["Accept"] == "application/jsonlines"
    assert job["TransformResources"] == {"InstanceType": "ml.m5.2xlarge", "InstanceCount": 3}
    status, _, err = cli(capsys, *args)
    assert status == 2 and "already exists" in err
    sm.delete_model(ModelName="gpt-2-batch")


def test_a_failed_deploy_leaves_nothing(aws, role, capsys):
    status, _, err = cli(capsys, "deploy", "--name", "bad", "--image-uri", IMAGE, "--role", role,
                         "--instance-type", "ml.no-such-type")  # fmt: skip
    assert status == 2 and "CreateEndpointConfig" in err
    assert aws.client("sagemaker").list_models()["Models"] == []


def test_clear_errors(aws, capsys, monkeypatch, tmp_path):
    missing = "arn:aws:iam::123456789012:role/no-such-role"
    status, _, err = cli(capsys, "deploy", "--name", "x", "--image-uri", IMAGE, "--role", missing)
    assert status == 2 and f"the role {missing} does not exist" in err
    status, _, err = cli(capsys, "deploy", "--name", "x", "--image-uri", IMAGE, "--role", "admin")
    assert status == 2 and "IAM role ARN" in err
    assert aws.client("sagemaker").list_models()["Models"] == []

    for key in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    status, _, err = cli(capsys, "status", "--name", "x")
    assert status == 2 and "no AWS region" in err
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    status, _, err = cli(capsys, "status", "--name", "x", "--region", REGION)
    assert status == 2 and "no AWS credentials found" in err
    with pytest.raises(SystemExit):
        main(["sagemaker", "deploy", "--name", "x", "--image-uri", IMAGE, "--role", missing,
              "--autoscale", "3:1"])  # fmt: skip
