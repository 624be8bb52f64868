"""Settings from the environment: parsing, validation, every problem at once, secrets hidden."""

from __future__ import annotations

import socket
from dataclasses import dataclass, make_dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from cloudadaptor import config
from cloudadaptor.config import (
    ConfigError,
    Key,
    Problem,
    Settings,
    check,
    effective_settings,
    load_settings,
    parse_bool,
    parse_duration,
    parse_keys,
    parse_tags,
)
from cloudadaptor.providers import base
from cloudadaptor.providers.config import ProviderConfig, option

SECRET = "s3cr3t-Value-never-shown"


def env(**kv: str) -> dict[str, str]:
    return {"CLOUD_PROVIDER": "local", **kv}


def problems_of(environ: dict[str, str]) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    return info.value.problems


# ---------------------------------------------------------------- durations

@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("300ms", 0.3),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("2h45m30s", 9930.0),
        ("1m30.5s", 90.5),
        (".5s", 0.5),
        ("1500us", 0.0015),
        ("1500µs", 0.0015),
        ("1000000ns", 0.001),
    ],
)
def test_parse_duration_accepts_go_syntax(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds), f"{text!r} should be {seconds} s"


@pytest.mark.parametrize("text", ["", "5", "10", "-5m", "+5m", "5 m", "m", "1h30", "5min", "1.2.3s", "abc", "."])
def test_parse_duration_rejects_bad_text_saying_the_format(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert "1h30m" in str(info.value), "the message should show the expected format"


def test_format_duration_round_trips_through_parse():
    for seconds in (300.0, 5400.0, 90.0, 0.3, 9930.0):
        assert parse_duration(config.format_duration(seconds)) == pytest.approx(seconds)


# ---------------------------------------------------------------- bools, tags

@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_parse_bool_true_set_is_gos(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_parse_bool_false_set_is_gos(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["yes", "no", "on", "tRUE", "2", "y"])
def test_parse_bool_rejects_other_words(text):
    with pytest.raises(ValueError, match="true or false"):
        parse_bool(text)


def test_parse_tags_reads_pairs_and_names_a_bad_one():
    assert parse_tags("team=peer,env=dev, x = y ") == {"team": "peer", "env": "dev", "x": "y"}
    assert parse_tags("a=b=c") == {"a": "b=c"}
    with pytest.raises(ValueError, match="'oops'"):
        parse_tags("a=b,oops,c=d")
    with pytest.raises(ValueError, match="'=v'"):
        parse_tags("=v")


# ---------------------------------------------------------------- settings

def test_defaults_match_the_operator_documentation():
    s = load_settings(env())
    assert s.cloud_provider == "local"
    assert s.vxlan_port == 9000
    assert s.vxlan_min_id == 555000
    assert s.proxy_timeout == 300.0
    assert s.peerpods_limit_per_node == 10
    assert s.disable_cvm is None, "unset DISABLECVM must stay distinguishable from false"
    assert s.tls_min_version == "1.2"
    assert s.use_public_ip is False and s.disable_tls is False and s.tls_skip_verify is False
    assert s.socket == Path("/run/peerpod/hypervisor.sock")
    assert s.pods_dir == Path("/run/peerpod/pods")
    assert s.state_dir == Path("/run/peerpod")
    assert s.node_name == socket.gethostname()
    assert s.log_level == "info"
    assert s.tags == {} and s.podvm_instance_types == () and s.root_volume_size == 0


def test_values_are_parsed_into_their_types():
    s = load_settings(env(
        VXLAN_PORT="4789", VXLAN_MIN_ID="7", PROXY_TIMEOUT="90s", DISABLECVM="false",
        TAGS="a=1,b=2", USE_PUBLIC_IP="T", ROOT_VOLUME_SIZE="30", PEERPODS_LIMIT_PER_NODE="0",
        PODVM_INSTANCE_TYPES="t3.small, t3.medium", PODVM_INSTANCE_TYPE="t3.medium",
        TLS_MIN_VERSION="1.3", GRPC_ENDPOINT="127.0.0.1:50051", NODE_NAME="worker-1",
        LOG_LEVEL="DEBUG", SOCKET="/tmp/h.sock",
    ))
    assert (s.vxlan_port, s.vxlan_min_id, s.proxy_timeout) == (4789, 7, 90.0)
    assert s.disable_cvm is False
    assert s.tags == {"a": "1", "b": "2"}
    assert s.use_public_ip is True
    assert (s.root_volume_size, s.peerpods_limit_per_node) == (30, 0)
    assert s.podvm_instance_types == ("t3.small", "t3.medium")
    assert s.podvm_instance_type == "t3.medium"
    assert s.tls_min_version == "1.3"
    assert s.grpc_endpoint == "127.0.0.1:50051"
    assert (s.node_name, s.log_level, s.socket) == ("worker-1", "debug", Path("/tmp/h.sock"))


def test_empty_values_count_as_unset():
    s = load_settings(env(VXLAN_PORT="", DISABLECVM=" ", PODVM_INSTANCE_TYPE=""))
    assert s.vxlan_port == 9000 and s.disable_cvm is None and s.podvm_instance_type is None


BAD_VALUES = [
    ("VXLAN_PORT", "0", "1 to 65535"),
    ("VXLAN_PORT", "65536", "1 to 65535"),
    ("VXLAN_PORT", "nine", "1 to 65535"),
    ("VXLAN_MIN_ID", "16777216", "1 to 16777215"),
    ("VXLAN_MIN_ID", "0", "1 to 16777215"),
    ("PROXY_TIMEOUT", "5", "1h30m"),
    ("PROXY_TIMEOUT", "0", "600 s"),
    ("PROXY_TIMEOUT", "10m", "600 s"),
    ("PROXY_TIMEOUT", "1h", "600 s"),
    ("DISABLECVM", "yes", "true or false"),
    ("TAGS", "a=1,b", "'b'"),
    ("USE_PUBLIC_IP", "maybe", "true or false"),
    ("ROOT_VOLUME_SIZE", "-1", "at least 0"),
    ("ROOT_VOLUME_SIZE", "30G", "at least 0"),
    ("PEERPODS_LIMIT_PER_NODE", "-3", "at least 0"),
    ("CACERT_FILE", "/nonexistent/ca.pem", "readable file"),
    ("TLS_SKIP_VERIFY", "nope", "true or false"),
    ("DISABLE_TLS", "2", "true or false"),
    ("TLS_MIN_VERSION", "1.1", "not allowed"),
    ("TLS_MIN_VERSION", "1.0", "not allowed"),
    ("TLS_MIN_VERSION", "2.0", "1.2 or 1.3"),
    ("SOCKET", "relative.sock", "absolute path"),
    ("PODS_DIR", "pods", "absolute path"),
    ("STATE_DIR", "state", "absolute path"),
    ("GRPC_ENDPOINT", "localhost", "host:port"),
    ("GRPC_ENDPOINT", "localhost:99999", "host:port"),
    ("LOG_LEVEL", "verbose", "debug, info, warning, error"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES)
def test_bad_value_gives_a_problem_naming_key_value_and_expectation(key, value, expected):
    problems = [p for p in problems_of(env(**{key: value})) if p.key == key]
    assert problems, f"{key}={value!r} should be refused"
    line = str(problems[0])
    assert line.startswith(f'{key}="{value}": '), line
    assert expected in line, f"{line!r} should say {expected!r}"
    assert "\n" not in line


def test_every_problem_is_reported_together():
    err_env = env(VXLAN_PORT="0", PROXY_TIMEOUT="forever", TAGS="x", LOG_LEVEL="loud")
    err_env["CLOUD_PROVIDER"] = "gce"
    with pytest.raises(ConfigError) as info:
        load_settings(err_env)
    keys = [p.key for p in info.value.problems]
    assert keys == ["CLOUD_PROVIDER", "VXLAN_PORT", "PROXY_TIMEOUT", "TAGS", "LOG_LEVEL"]
    assert str(info.value).count("\n") == 4, "one line per problem"


def test_unknown_cloud_provider_names_the_valid_ones():
    problems = problems_of({"CLOUD_PROVIDER": "gce"})
    assert [p.key for p in problems] == ["CLOUD_PROVIDER"]
    for name in base.provider_names():
        assert name in str(problems[0])
    assert "local" in str(problems[0])


def test_missing_cloud_provider_is_required():
    problems = problems_of({})
    assert str(problems[0]).startswith("CLOUD_PROVIDER is not set: required")
    assert "local" in str(problems[0])


def test_instance_type_must_be_in_the_allow_list():
    problems = problems_of(env(PODVM_INSTANCE_TYPES="t3.small,t3.medium", PODVM_INSTANCE_TYPE="m5.xlarge"))
    assert len(problems) == 1
    assert str(problems[0]) == 'PODVM_INSTANCE_TYPE="m5.xlarge": expected one of PODVM_INSTANCE_TYPES: t3.small, t3.medium'


def test_tls_files_come_all_three_or_none(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    problems = problems_of(env(CERT_FILE=str(cert)))
    assert sorted(p.key for p in problems) == ["CACERT_FILE", "CERT_KEY"]
    assert all("together" in str(p) for p in problems)
    s = load_settings(env(CERT_FILE=str(cert), CERT_KEY=str(cert), CACERT_FILE=str(cert)))
    assert s.operator_tls and s.cert_file == cert


def test_flag_overrides_win_over_env():
    s = load_settings(env(VXLAN_PORT="4789"), overrides={"VXLAN_PORT": "5000", "SOCKET": None})
    assert s.vxlan_port == 5000 and s.socket == Path("/run/peerpod/hypervisor.sock")


def test_settings_keep_the_raw_env_for_providers():
    s = load_settings(env(AWS_REGION="eu-west-1", AWS_SECRET_ACCESS_KEY=SECRET))
    assert s.provider_env["AWS_REGION"] == "eu-west-1"
    values, problems = parse_keys([Key("AWS_REGION", str, required=True)], s.provider_env)
    assert values == {"AWS_REGION": "eu-west-1"} and problems == []


def test_settings_can_be_built_directly_for_tests():
    s = Settings(cloud_provider="local", vxlan_port=4789)
    assert s.vxlan_port == 4789 and s.proxy_timeout == 300.0


# ---------------------------------------------------------------- secrets

def test_secret_value_never_appears_in_a_problem():
    key = Key("API_TOKEN", lambda t: int(t), secret=True)
    _, problems = parse_keys([key], {"API_TOKEN": SECRET})
    assert problems and SECRET not in str(problems[0]) and SECRET not in repr(problems[0])
    assert str(problems[0]).startswith('API_TOKEN="<hidden>"')
    direct = Problem("API_TOKEN", SECRET, "expected x", secret=True)
    assert SECRET not in str(direct) and SECRET not in repr(direct)


def test_secret_value_never_appears_in_settings_repr_or_config_check():
    environ = env(AWS_SECRET_ACCESS_KEY=SECRET, AZURE_CLIENT_SECRET=SECRET,
                  AWS_SESSION_TOKEN=SECRET, AWS_ACCESS_KEY_ID=SECRET)
    s = load_settings(environ)
    assert SECRET not in repr(s) and SECRET not in str(s)
    rows = effective_settings(environ)
    assert SECRET not in repr(rows)
    shown = {key: value for key, value, _ in rows}
    for name in ("AWS_SECRET_ACCESS_KEY", "AZURE_CLIENT_SECRET", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        assert shown[name] == "<hidden>"
    assert {k: v for k, v, _ in effective_settings(env())}["AWS_SECRET_ACCESS_KEY"] == "<unset>"


def test_config_error_message_hides_secrets_even_with_other_problems():
    environ = env(VXLAN_PORT="x", AWS_SECRET_ACCESS_KEY=SECRET)
    with pytest.raises(ConfigError) as info:
        load_settings(environ)
    assert SECRET not in str(info.value)


# ---------------------------------------------------------------- config check

@dataclass(frozen=True)
class FakeConfig(ProviderConfig):
    region: str = option("FAKE_REGION", str, required=True, help="the region")
    port: int = option("FAKE_PORT", config.parse_port, 22)
    password: str | None = option("FAKE_PASSWORD", str, secret=True)
    timeout: float = option("FAKE_TIMEOUT", parse_duration, 30.0)


class FakeProvider:
    config_type = FakeConfig


@dataclass(frozen=True)
class NoKeys(ProviderConfig):
    pass


class ProviderWithoutKeys:
    config_type = NoKeys


def install(monkeypatch, **classes):
    """Make ``classes`` installed providers (next to the real ones), by name."""
    installed = base.installed_providers()
    fakes = {name: EntryPoint(name, f"tests.fake:{name}", base.ENTRY_POINT_GROUP) for name in classes}
    monkeypatch.setattr(base, "installed_providers", lambda: {**installed, **fakes})
    monkeypatch.setattr(base, "load_provider_class", lambda name: classes[name])


def provider_with(*options_: tuple[str, object]) -> type:
    """A provider class whose config declares ``options_`` as (key, default) str options."""
    fields = [(f"f{i}", object, option(key, str, default)) for i, (key, default) in enumerate(options_)]
    config_type = make_dataclass("Declared", fields, bases=(ProviderConfig,), frozen=True)
    return type("Declares", (), {"config_type": config_type})


@pytest.fixture
def fake_providers(monkeypatch):
    install(monkeypatch, fake=FakeProvider, bare=ProviderWithoutKeys)


def test_effective_settings_show_value_and_source(fake_providers):
    rows = effective_settings({"CLOUD_PROVIDER": "fake", "VXLAN_PORT": "4789",
                               "FAKE_REGION": "r1", "FAKE_PASSWORD": SECRET})
    table = {key: (value, source) for key, value, source in rows}
    assert table["VXLAN_PORT"] == ("4789", "env")
    assert table["PROXY_TIMEOUT"] == ("5m", "default")
    assert table["DISABLECVM"] == ("<unset>", "default")
    assert table["FAKE_REGION"] == ("r1", "env")
    assert table["FAKE_PORT"] == ("22", "default")
    assert table["FAKE_TIMEOUT"] == ("30s", "default")
    assert table["FAKE_PASSWORD"] == ("<hidden>", "env")
    assert SECRET not in repr(rows)


def test_check_combines_common_and_provider_problems(fake_providers):
    rows, problems = check({"CLOUD_PROVIDER": "fake", "VXLAN_PORT": "0", "FAKE_PORT": "x",
                            "FAKE_PASSWORD": SECRET})
    lines = [str(p) for p in problems]
    assert any(line.startswith('VXLAN_PORT="0"') for line in lines), lines
    assert any(line.startswith('FAKE_PORT="x"') for line in lines), lines
    assert any(line.startswith("FAKE_REGION is not set: required") for line in lines), lines
    assert SECRET not in repr(rows) + repr(problems)


def test_check_tolerates_a_provider_without_keys(fake_providers):
    rows, problems = check({"CLOUD_PROVIDER": "bare"})
    assert problems == []
    assert "VXLAN_PORT" in {key for key, _, _ in rows}


def test_check_reports_a_provider_that_cannot_be_imported(monkeypatch):
    broken = EntryPoint("broken", "cloudadaptor.providers.no_such_module:X", base.ENTRY_POINT_GROUP)
    installed = base.installed_providers()
    monkeypatch.setattr(base, "installed_providers", lambda: {**installed, "broken": broken})
    _, problems = check({"CLOUD_PROVIDER": "broken"})
    assert [p.key for p in problems] == ["CLOUD_PROVIDER"]
    assert "could not be loaded" in str(problems[0])


def test_a_provider_secret_redeclared_without_the_flag_stays_hidden(monkeypatch):
    install(monkeypatch, **{"aws-like": provider_with(("AWS_SECRET_ACCESS_KEY", None))})
    rows, _ = check({"CLOUD_PROVIDER": "aws-like", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert [r for r in rows if r[0] == "AWS_SECRET_ACCESS_KEY"] == [("AWS_SECRET_ACCESS_KEY", "<hidden>", "env")]


def test_a_key_shared_with_the_provider_is_listed_once_and_still_checked(monkeypatch):
    install(monkeypatch, **{"aws-like": provider_with(("PODVM_INSTANCE_TYPE", "t3.medium"))})
    rows, problems = check({"CLOUD_PROVIDER": "aws-like", "PODVM_INSTANCE_TYPE": "m5.large",
                            "PODVM_INSTANCE_TYPES": "t3.small"})
    assert [r[0] for r in rows].count("PODVM_INSTANCE_TYPE") == 1
    assert [p.key for p in problems] == ["PODVM_INSTANCE_TYPE"], "check must refuse what serve refuses"


def test_initdata_is_parsed_once_and_config_check_shows_its_digest_never_its_content():
    import base64
    import gzip
    import hashlib

    document = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cdh.toml" = "kbs_token = \'s3cr3t-token\'"\n'
    encoded = base64.b64encode(gzip.compress(document)).decode()
    s = load_settings(env(INITDATA=encoded))
    assert s.initdata is not None and s.initdata.document == document
    assert "s3cr3t" not in repr(s)
    rows = {key: (value, source) for key, value, source in effective_settings(env(INITDATA=encoded))}
    assert rows["INITDATA"] == (f"<set, sha256 {hashlib.sha256(document).hexdigest()}>", "env")
    assert "s3cr3t" not in repr(rows) and encoded not in repr(rows)
    assert {k: v for k, v, _ in effective_settings(env())}["INITDATA"] == "<unset>"


def test_bad_initdata_is_a_config_problem_naming_the_part_not_the_value():
    import base64

    bad = base64.b64encode(b'version = "0.1.0"\nalgorithm = "md4"\n# s3cr3t\n').decode()
    with pytest.raises(ConfigError) as info:
        load_settings(env(INITDATA=bad))
    message = str(info.value)
    assert "INITDATA" in message and "'algorithm' is not one of" in message, message
    assert bad not in message and "s3cr3t" not in message


def test_bad_pool_settings_are_refused_with_one_line_per_key():
    problems = problems_of(env(PODVM_POOL_SIZE="-1", PODVM_POOL_MAX_AGE="0s", PODVM_POOL_REFILL_CONCURRENCY="zero"))
    lines = {p.key: str(p) for p in problems}
    assert set(lines) == {"PODVM_POOL_SIZE", "PODVM_POOL_MAX_AGE", "PODVM_POOL_REFILL_CONCURRENCY"}
    assert "integer from 0 to 1000" in lines["PODVM_POOL_SIZE"]
    assert "duration above zero" in lines["PODVM_POOL_MAX_AGE"]
    assert "integer from 1 to 100" in lines["PODVM_POOL_REFILL_CONCURRENCY"]
    assert all("\n" not in line for line in lines.values())


def test_pool_settings_default_to_off_and_parse_durations():
    assert (load_settings(env()).podvm_pool_size, load_settings(env()).podvm_pool_max_age) == (0, 86400.0)
    settings = load_settings(env(PODVM_POOL_SIZE="3", PODVM_POOL_MAX_AGE="6h", PODVM_POOL_REFILL_CONCURRENCY="4"))
    assert (settings.podvm_pool_size, settings.podvm_pool_max_age, settings.podvm_pool_refill_concurrency) == (3, 21600.0, 4)


def test_a_pool_is_refused_without_tls():
    [problem] = problems_of(env(PODVM_POOL_SIZE="2", DISABLE_TLS="true"))
    assert problem.key == "PODVM_POOL_SIZE" and "mutual TLS" in str(problem)
