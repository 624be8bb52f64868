"""Idle daemon memory for each cloud provider: local, aws (moto server), azure (local ARM endpoint).

Each daemon is started the way an operator would (``serve`` with the
provider's keys), talks to its cloud at start (verify), and is sampled once
it has served its socket for a while. The clouds are the tests' fakes
(``tests/fakes``); nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import procs
from bench.table import Row

SETTLE = 2.0
TESTS = Path(__file__).resolve().parents[1] / "tests"


def _daemon_dirs(directory: Path) -> dict[str, str]:
    return {"NODE_NAME": "bench-worker", "STATE_DIR": str(directory / "state"),
            "SOCKET": str(directory / "hv.sock"), "PODS_DIR": str(directory / "pods")}


@contextlib.contextmanager
def _aws_env() -> Iterator[dict[str, str]]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        keys = {"AWS_ACCESS_KEY_ID": "AKIABENCHBENCH000000", "AWS_SECRET_ACCESS_KEY": "bench-secret-not-real"}
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=endpoint,
                           aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        vpc = ec2.create_vpc(CidrBlock="203.0.113.0/24")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="203.0.113.0/25")["Subnet"]["SubnetId"]
        sg = ec2.create_security_group(GroupName="worker", Description="worker", VpcId=vpc)["GroupId"]
        ami = ec2.register_image(Name="peer-pod-ami")["ImageId"]
        yield {"CLOUD_PROVIDER": "aws", "AWS_REGION": "us-east-1", **keys, "AWS_ENDPOINT_URL": endpoint,
               "AWS_SUBNET_ID": subnet, "AWS_VPC_ID": vpc, "AWS_SG_IDS": sg, "PODVM_AMI_ID": ami,
               "PODVM_INSTANCE_TYPE": "t3.medium", "AWS_CONFIG_FILE": "/dev/null",
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true",
               "VXLAN_WORKER_IP": "203.0.113.126"}
    finally:
        server.stop()


@contextlib.contextmanager
def _azure_env(directory: Path) -> Iterator[dict[str, str]]:
    sys.path.insert(0, str(TESTS))
    from fakes.armserver import FakeArm, azure_env

    key = directory / "id_rsa.pub"
    key.write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 bench@example\n")
    with FakeArm() as arm:
        yield {**azure_env(arm, arm.populate(), key), "REQUESTS_CA_BUNDLE": arm.ca_file,
               "VXLAN_WORKER_IP": "203.0.113.126"}


def _idle_rss(env: dict[str, str], directory: Path, command: list[str]) -> float:
    log = directory / "daemon.log"
    daemon = procs.python(*command, env={**os.environ, **env, **_daemon_dirs(directory)}, log=log)
    with procs.running(daemon):
        try:
            procs.wait_for_path(directory / "hv.sock", daemon, timeout=60)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; daemon log:\n{log.read_text()[-2000:]}") from None
        time.sleep(SETTLE)
        return max(procs.rss_mib(daemon.pid) for _ in range(3) if time.sleep(0.2) is None)


def run(quick: bool) -> list[Row]:
    rows = []
    serve = ["-m", "cloudadaptor.cli", "serve"]
    for name in ("local", "aws", "azure"):
        with tempfile.TemporaryDirectory(prefix=f"bench-mem-{name}-") as tmp:
            directory = Path(tmp)
            if name == "local":
                rss = _idle_rss({"CLOUD_PROVIDER": "local"}, directory, serve)
            elif name == "aws":
                with _aws_env() as env:
                    rss = _idle_rss(env, directory, serve)
            else:
                with _azure_env(directory) as env:
                    rss = _idle_rss(env, directory, ["-m", "bench.cloudserve", "azure"])
        rows.append(Row(f"daemon RSS idle, CLOUD_PROVIDER={name}", rss, "MiB", 60, "limit", "≤ 60 MiB"))
    return rows
