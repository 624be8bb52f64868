"""AWS consoles: GetConsoleOutput through the real boto3 against moto, and a refusal said plainly."""

from __future__ import annotations

from typing import Any

import pytest
from awsworld import Ec2World, Hooks, ec2_error, spec_for

from cloudadaptor.providers.base import ConsoleUnavailable


async def test_console_output_is_decoded_from_get_console_output(aws: Ec2World):
    provider = aws.provider()
    instance = await provider.create_instance(spec_for())
    text = await provider.console_output(instance.id)
    assert "Linux version" in text, "moto's sample console, as GetConsoleOutput returned it"
    assert isinstance(text, str) and "\x00" not in text


async def test_refused_get_console_output_says_not_available_and_why(aws: Ec2World, hooks: Hooks):
    provider = aws.provider()
    instance = await provider.create_instance(spec_for())

    def refuse(**kwargs: Any) -> Any:
        return ec2_error("UnauthorizedOperation", "You are not authorized to perform: ec2:GetConsoleOutput", 403)

    hooks.on(await provider.client(), "before-send.ec2.GetConsoleOutput", refuse)
    with pytest.raises(ConsoleUnavailable) as err:
        await provider.console_output(instance.id)
    message = str(err.value)
    assert "GetConsoleOutput" in message and "UnauthorizedOperation" in message, message
    assert aws.env()["AWS_SECRET_ACCESS_KEY"] not in message


def test_base64_output_is_decoded_and_plain_text_kept():
    from cloudadaptor.providers.aws.provider import _decode_console

    assert _decode_console("Ym9vdGluZwpkb25lCg==") == "booting\ndone\n"
    assert _decode_console("Linux version 6.1 (not base64!)") == "Linux version 6.1 (not base64!)"
