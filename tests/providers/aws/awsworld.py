"""Helpers for the AWS tests: the EC2 world in moto, specs, botocore hooks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from botocore.awsrequest import AWSResponse

from cloudadaptor.config import Settings, load_settings
from cloudadaptor.providers.aws.provider import AwsProvider
from cloudadaptor.providers.base import InstanceSpec, create_provider

REGION = "us-east-1"
ACCESS_KEY = "AKIATESTTESTTEST1234"
SECRET_KEY = "s3cr3t-never-shown/abcdefghijklmnopqrstuv"


@dataclass
class Ec2World:
    """One test's EC2: ids of what exists, and helpers to build providers over it."""

    endpoint: str
    ec2: Any  # the test's own client (no hooks)
    vpc_id: str
    subnet_id: str
    sg_id: str
    ami_id: str
    providers: list[AwsProvider] = dataclasses.field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        """peer-pods-cm + peer-pods-secret as a worker would get them."""
        env = {
            "CLOUD_PROVIDER": "aws",
            "NODE_NAME": "worker-1",
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_SUBNET_ID": self.subnet_id,
            "AWS_VPC_ID": self.vpc_id,
            "AWS_SG_IDS": self.sg_id,
            "PODVM_AMI_ID": self.ami_id,
            "PODVM_INSTANCE_TYPE": "t3.medium",
            "VXLAN_PORT": "9000",
            "PROXY_TIMEOUT": "5m",
        }
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    def settings(self, **overrides: str) -> Settings:
        return load_settings(self.env(**overrides))

    def provider(self, **overrides: str) -> AwsProvider:
        provider = create_provider(self.settings(**overrides))
        assert isinstance(provider, AwsProvider)
        provider.config = dataclasses.replace(provider.config, boot_poll_interval=0.2, boot_timeout=5.0)
        self.providers.append(provider)
        return provider

    def instances(self, **tags: str) -> list[dict[str, Any]]:
        """Every instance (any state) carrying ``tags``."""
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
        found = []
        for reservation in self.ec2.describe_instances(Filters=filters)["Reservations"]:
            found.extend(reservation["Instances"])
        return found

    def alive(self, **tags: str) -> list[str]:
        """Ids of instances with ``tags`` that are not terminated (or shutting down)."""
        return sorted(i["InstanceId"] for i in self.instances(**tags)
                      if i["State"]["Name"] not in ("terminated", "shutting-down"))


def spec_for(sandbox_id: str = "a" * 64, *, node: str = "worker-1", **changes: Any) -> InstanceSpec:
    """The spec the lifecycle would pass for pod default/web-<sandbox>."""
    from cloudadaptor.adaptor.validation import client_token_for, vm_name_for
    from cloudadaptor.providers import base

    pod = f"web-{sandbox_id[:4]}"
    spec = InstanceSpec(
        name=vm_name_for(pod, sandbox_id),
        sandbox_id=sandbox_id,
        user_data="#cloud-config\nwrite_files: []\n",
        client_token=client_token_for(sandbox_id),
        tags={
            base.TAG_OWNER: base.OWNER_VALUE,
            base.TAG_NODE: node,
            base.TAG_SANDBOX: sandbox_id,
            base.TAG_POD: f"default/{pod}",
        },
        vcpus=1,
        memory_mib=2048,
    )
    return dataclasses.replace(spec, **changes)


class Hooks:
    """botocore event hooks on one provider's client, removed at teardown."""

    def __init__(self) -> None:
        self._registered: list[tuple[Any, str, Callable[..., Any]]] = []

    def on(self, client: Any, event: str, handler: Callable[..., Any]) -> None:
        client.meta.events.register(event, handler)
        self._registered.append((client, event, handler))

    def close(self) -> None:
        for client, event, handler in self._registered:
            client.meta.events.unregister(event, handler)


class RawBody:
    """Enough of a urllib3 response for botocore to read an injected body."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


def ec2_error(code: str, message: str, status: int) -> AWSResponse:
    """An EC2 error response as the service sends it (query protocol XML)."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error></Errors><RequestID>injected</RequestID></Response>"
    ).encode()
    return AWSResponse("https://ec2.injected", status, {"Content-Type": "text/xml"}, RawBody(body))


def ec2_reply(url: str, body: bytes) -> AWSResponse:
    """A 200 EC2 response carrying ``body`` (e.g. one recorded earlier)."""
    return AWSResponse(url, 200, {"Content-Type": "text/xml"}, RawBody(body))
