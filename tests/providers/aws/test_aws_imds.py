"""Region, subnet, VPC and security groups discovered from a worker's IMDSv2 (a local HTTP server)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from awsworld import REGION, Ec2World, spec_for

from cloudadaptor import cli
from cloudadaptor.providers import base
from cloudadaptor.providers.aws.imds import ImdsClient, ImdsError

TOKEN = "imds-session-token"
MAC = "0e:11:22:33:44:55"


class FakeImds:
    """IMDSv2 only: GETs without the session token from PUT /latest/api/token get 401."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                fake.requests.append(f"PUT {self.path}")
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400, "")
                self._send(200, TOKEN)

            def do_GET(self) -> None:
                fake.requests.append(f"GET {self.path}")
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    return self._send(401, "")
                value = fake.metadata.get(self.path.removeprefix("/latest/meta-data/"))
                self._send(200, value) if value is not None else self._send(404, "")

            def _send(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds(aws: Ec2World) -> Iterator[FakeImds]:
    nic = f"network/interfaces/macs/{MAC}/"
    fake = FakeImds({
        "mac": MAC,
        "placement/region": REGION,
        nic + "subnet-id": aws.subnet_id,
        nic + "vpc-id": aws.vpc_id,
        nic + "security-group-ids": f"{aws.sg_id}\n",
    })
    yield fake
    fake.close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


EMPTY = {"AWS_REGION": "", "AWS_SUBNET_ID": "", "AWS_VPC_ID": "", "AWS_SG_IDS": ""}


async def test_empty_keys_are_discovered_from_the_workers_metadata(aws: Ec2World, imds: FakeImds):
    provider = aws.provider(**EMPTY, AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    assert await provider.verify() == []
    config = provider.config
    assert (config.region, config.subnet_id, config.vpc_id, config.security_group_ids) == (
        REGION, aws.subnet_id, aws.vpc_id, (aws.sg_id,))
    assert imds.requests[0] == "PUT /latest/api/token"
    instance = await provider.create_instance(spec_for())
    [described] = aws.instances(**{base.TAG_SANDBOX: "a" * 64})
    assert described["InstanceId"] == instance.id and described["SubnetId"] == aws.subnet_id


async def test_configured_keys_are_not_replaced_by_metadata(aws: Ec2World, imds: FakeImds):
    other_subnet = aws.ec2.create_subnet(VpcId=aws.vpc_id, CidrBlock="203.0.113.128/25")["Subnet"]["SubnetId"]
    provider = aws.provider(AWS_SUBNET_ID=other_subnet, AWS_VPC_ID="", AWS_SG_IDS="",
                            AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    assert await provider.verify() == []
    assert provider.config.subnet_id == other_subnet
    assert provider.config.security_group_ids == (aws.sg_id,)
    assert provider.config.vpc_id is None, "the worker's VPC says nothing about a configured subnet"


async def test_with_a_launch_template_only_the_region_comes_from_metadata(aws: Ec2World, imds: FakeImds):
    aws.ec2.create_launch_template(LaunchTemplateName="kata", LaunchTemplateData={"ImageId": aws.ami_id})
    provider = aws.provider(**EMPTY, USE_PODVM_LAUNCHTEMPLATE="true", AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    assert await provider.verify() == []
    assert provider.config.region == REGION
    assert (provider.config.subnet_id, provider.config.security_group_ids) == (None, ())


async def test_metadata_is_not_asked_when_nothing_is_missing(aws: Ec2World, imds: FakeImds):
    provider = aws.provider(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
    assert await provider.verify() == []
    assert imds.requests == []


async def test_unreachable_metadata_names_each_key_still_needed(aws: Ec2World):
    provider = aws.provider(**EMPTY, AWS_EC2_METADATA_SERVICE_ENDPOINT=_closed_port_url())
    problems = await provider.verify()
    assert [p.split(" ", 1)[0] for p in problems] == ["AWS_REGION", "AWS_SUBNET_ID"], problems
    assert all("is not set and the worker's instance metadata" in p for p in problems), problems


def test_imds_client_reads_placement_with_the_session_token():
    nic = f"network/interfaces/macs/{MAC}/"
    fake = FakeImds({"mac": MAC, "placement/region": "eu-west-3", nic + "subnet-id": "subnet-0a0a0a0a",
                     nic + "vpc-id": "vpc-0b0b0b0b", nic + "security-group-ids": "sg-01010101\nsg-02020202\n"})
    try:
        client = ImdsClient(fake.endpoint)
        placement = client.placement()
        assert placement.region == "eu-west-3" and placement.subnet_id == "subnet-0a0a0a0a"
        assert placement.security_group_ids == ("sg-01010101", "sg-02020202")
        assert fake.requests[0] == "PUT /latest/api/token"
        with pytest.raises(ImdsError, match="HTTP 401"):
            client.get("mac", "wrong-token")
    finally:
        fake.close()


def test_open_ports_defaults_to_the_workers_first_group(aws: Ec2World, imds: FakeImds, monkeypatch, capsys):
    for key, value in aws.env(**EMPTY, AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint).items():
        monkeypatch.setenv(key, value)
    assert cli.main(["aws", "open-ports"]) == 0
    assert capsys.readouterr().out.startswith(f"{aws.sg_id}: 15150/tcp")
