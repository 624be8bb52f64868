"""The provider configuration contract: declared options, one loader, every problem at once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cloudadaptor.config import ConfigError, Settings, check
from cloudadaptor.providers import base
from cloudadaptor.providers.aws.config import AwsConfig
from cloudadaptor.providers.azure.config import AzureConfig
from cloudadaptor.providers.config import ProviderConfig, option
from cloudadaptor.providers.local import LocalConfig, LocalProvider

SECRET = "n0t-for-your-eyes"


@dataclass(frozen=True)
class Declared(ProviderConfig):
    name: str = option("DECL_NAME", str, required=True, help="a name")
    count: int = option("DECL_COUNT", int, 3)
    password: str | None = option("DECL_PASSWORD", str, secret=True)
    labels: dict = option("DECL_LABELS", lambda text: dict([text.split("=")]), {})


def test_options_declare_key_parser_default_secret_and_help():
    keys = {key.name: key for key in Declared.keys()}
    assert list(keys) == ["DECL_NAME", "DECL_COUNT", "DECL_PASSWORD", "DECL_LABELS"]
    assert keys["DECL_NAME"].required and keys["DECL_NAME"].help == "a name"
    assert keys["DECL_COUNT"].default == 3 and keys["DECL_PASSWORD"].secret


def test_a_loaded_config_is_typed_and_hides_its_secrets():
    config = Declared.load(Settings(provider_env={"DECL_NAME": "n", "DECL_COUNT": "7", "DECL_PASSWORD": SECRET}))
    assert (config.name, config.count, config.password) == ("n", 7, SECRET)
    assert SECRET not in repr(config)
    assert Declared.load(Settings(provider_env={"DECL_NAME": "n"})).labels == {}


def test_mutable_defaults_are_not_shared_between_configs():
    one = Declared.load(Settings(provider_env={"DECL_NAME": "a"}))
    two = Declared.load(Settings(provider_env={"DECL_NAME": "b"}))
    assert one.labels is not two.labels


def test_load_reports_every_problem_and_relaxed_keys_are_optional():
    with pytest.raises(ConfigError) as err:
        Declared.load(Settings(provider_env={"DECL_COUNT": "many", "DECL_PASSWORD": SECRET}))
    assert [p.key for p in err.value.problems] == ["DECL_NAME", "DECL_COUNT"]
    assert Declared.load(Settings(), relaxed=("DECL_NAME",)).name == ""


def test_load_provider_reports_common_and_provider_problems_together():
    with pytest.raises(ConfigError) as err:
        base.load_provider({"CLOUD_PROVIDER": "aws", "VXLAN_PORT": "0", "AWS_REGION": "Mars",
                            "AWS_ACCESS_KEY_ID": SECRET})
    keys = [p.key for p in err.value.problems]
    assert keys == ["VXLAN_PORT", "AWS_REGION", "AWS_SECRET_ACCESS_KEY"], [str(p) for p in err.value.problems]
    assert SECRET not in str(err.value)


def test_load_provider_forces_the_provider_of_a_cloud_command():
    settings, config = base.load_provider({"CLOUD_PROVIDER": "local", "TAGS": "team=a"}, provider="aws")
    assert settings.cloud_provider == "aws" and isinstance(config, AwsConfig)
    assert config.tags == {"team": "a"}, "common keys reach the provider config"


def test_config_check_refuses_what_serve_refuses_between_keys():
    _, problems = check({"CLOUD_PROVIDER": "aws", "AWS_ACCESS_KEY_ID": SECRET})
    assert [p.key for p in problems] == ["AWS_SECRET_ACCESS_KEY"]
    assert SECRET not in repr(problems)


def test_every_built_in_provider_declares_its_config_type():
    for name, config_type in (("aws", AwsConfig), ("azure", AzureConfig), ("local", LocalConfig)):
        cls = base.load_provider_class(name)
        assert cls.config_type is config_type and cls.name == name
        assert issubclass(cls, base.ProviderBase)


def test_create_provider_uses_a_config_already_loaded(tmp_path):
    settings = Settings(cloud_provider="local", state_dir=tmp_path)
    config = LocalConfig.load(settings)
    provider = base.create_provider(settings, config)
    assert isinstance(provider, LocalProvider) and provider.config is config
    assert isinstance(provider, base.Provider)


def test_a_provider_without_a_hint_leaves_the_route_to_the_default():
    class Quiet(base.ProviderBase):
        name = "quiet"

    assert Quiet().network_hint() is None


def test_an_unknown_provider_names_the_installed_ones():
    with pytest.raises(ValueError, match="expected one of: aws, azure, local"):
        base.load_provider_class("gcp")
