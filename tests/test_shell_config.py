"""Daemon configuration: parsing, precedence, one-line errors, and real certificates."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest
import trustme

from scaiwave_federation.shell.config import (
    Config,
    ConfigError,
    client_ssl_context,
    load_config,
    parse_duration_ms,
    server_ssl_context,
)

TOKEN = "t" * 24


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(directory: Path, ca: trustme.CA, *names: str, stem: str = "server") -> tuple[Path, Path]:
    """Issue a certificate for ``names``; return (chain file, key file)."""
    cert = ca.issue_cert(*names)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    cert, key = write_cert(tmp_path, ca, "your-host.test")
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return {"cert": cert, "key": key, "ca": ca_path, "dir": tmp_path}


@pytest.fixture
def env(files: dict[str, Path]) -> dict[str, str]:
    return {
        "SCAIWAVE_SERVER_NAME": "your-host.test",
        "SCAIWAVE_TLS_CERT": str(files["cert"]),
        "SCAIWAVE_TLS_KEY": str(files["key"]),
        "SCAIWAVE_CA_BUNDLE": str(files["ca"]),
        "SCAIWAVE_ADMIN_TOKEN": TOKEN,
    }


def config_error(env: dict[str, str], toml_path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(env, toml_path)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- environment ---------------------------------------------------------------


def test_minimal_env_gives_defaults(env: dict[str, str], files: dict[str, Path]) -> None:
    config = load_config(env)
    assert config.server_name == "your-host.test"
    assert (config.server_host, config.server_port) == ("your-host.test", 443)
    assert config.public_base_url == "https://your-host.test"
    assert config.data_dir == Path("./scaiwave-data")
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8448)
    assert config.tls_cert == files["cert"] and config.ca_bundle == files["ca"]
    assert config.resolve == {}
    assert config.record_path is None
    assert config.clock_offset_ms == 0
    assert config.key_refetch_interval_ms == 30_000
    assert config.insecure_skip_tls_verify is False
    assert config.warnings() == []
    assert TOKEN not in repr(config)  # the admin token stays out of logs


def test_all_settings_from_env(env: dict[str, str], tmp_path: Path) -> None:
    config = load_config(
        {
            **env,
            "SCAIWAVE_SERVER_NAME": "peer.test:8449",
            "SCAIWAVE_DATA_DIR": str(tmp_path / "data"),
            "SCAIWAVE_LISTEN": "[::1]:9000",
            "SCAIWAVE_RESOLVE": "peer.test:8449:127.0.0.1, other.test:443:[::1]",
            "SCAIWAVE_RECORD": str(tmp_path / "rec.cbor"),
            "SCAIWAVE_CLOCK_OFFSET": "31d",
            "SCAIWAVE_KEY_REFETCH_INTERVAL": "90s",
            "SCAIWAVE_INSECURE_SKIP_TLS_VERIFY": "1",
        }
    )
    assert config.server_name == "peer.test:8449"
    assert (config.server_host, config.server_port) == ("peer.test", 8449)
    assert config.public_base_url == "https://peer.test:8449"
    assert (config.listen_host, config.listen_port) == ("::1", 9000)
    assert config.resolve == {("peer.test", 8449): "127.0.0.1", ("other.test", 443): "::1"}
    assert config.record_path == tmp_path / "rec.cbor"
    assert config.clock_offset_ms == 31 * 86_400_000
    assert config.key_refetch_interval_ms == 90_000
    assert config.insecure_skip_tls_verify is True
    text = " ".join(config.warnings())
    for setting in ("INSECURE_SKIP_TLS_VERIFY", "CLOCK_OFFSET", "RESOLVE", "RECORD"):
        assert f"SCAIWAVE_{setting}" in text


@pytest.mark.parametrize(
    ("given", "name", "host", "port"),
    [
        ("Your-Host.TEST", "your-host.test", "your-host.test", 443),
        ("your-host.test:443", "your-host.test", "your-host.test", 443),  # 443 is implied
        ("peer.test:8449", "peer.test:8449", "peer.test", 8449),
        ("Peer.Test.:8449", "peer.test:8449", "peer.test", 8449),  # a trailing dot is dropped
    ],
)
def test_server_names(env: dict[str, str], given: str, name: str, host: str, port: int) -> None:
    """One canonical spelling (core.names); IP literals are refused (below)."""
    config = load_config({**env, "SCAIWAVE_SERVER_NAME": given})
    assert (config.server_name, config.server_host, config.server_port) == (name, host, port)


@pytest.mark.parametrize("bad", ["https://peer.test", "peer.test:0", "peer.test:99999", "::1", "a_b.test", "x/y",
                                 "127.0.0.1:8448", "[::1]:8448", "[::1]", "bücher.example"])
def test_bad_server_names(env: dict[str, str], bad: str) -> None:
    assert config_error({**env, "SCAIWAVE_SERVER_NAME": bad}).startswith("SCAIWAVE_SERVER_NAME: expected host")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("peer.test:8449:127.0.0.1", {("peer.test", 8449): "127.0.0.1"}),
        ("Peer.Test:443:[::1]", {("peer.test", 443): "::1"}),
        ("a.test:1:10.0.0.1,b.test:2:10.0.0.2,", {("a.test", 1): "10.0.0.1", ("b.test", 2): "10.0.0.2"}),
    ],
)
def test_resolve(env: dict[str, str], value: str, expected: dict[tuple[str, int], str]) -> None:
    assert load_config({**env, "SCAIWAVE_RESOLVE": value}).resolve == expected


@pytest.mark.parametrize("bad", ["peer.test:8449", "peer.test:x:127.0.0.1", "peer.test:8449:not-an-ip", ":1:1.2.3.4"])
def test_bad_resolve(env: dict[str, str], bad: str) -> None:
    message = config_error({**env, "SCAIWAVE_RESOLVE": bad})
    assert message.startswith("SCAIWAVE_RESOLVE: expected name:port:address") and repr(bad) in message


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1500", 1500), ("250ms", 250), ("90s", 90_000), ("5m", 300_000), ("2h", 7_200_000),
     ("31d", 2_678_400_000), ("1w", 604_800_000), (" 2H ", 7_200_000), (1200, 1200)],
)
def test_durations(text: object, ms: int) -> None:
    assert parse_duration_ms(text) == ms


def test_negative_durations() -> None:
    assert parse_duration_ms("-2h", "SCAIWAVE_CLOCK_OFFSET", allow_negative=True) == -7_200_000
    with pytest.raises(ConfigError, match="must not be negative"):
        parse_duration_ms("-2h", "X")


@pytest.mark.parametrize("bad", ["", "2 hours", "1.5h", "h", "3y", "1h30m"])
def test_bad_durations(env: dict[str, str], bad: str) -> None:
    message = config_error({**env, "SCAIWAVE_CLOCK_OFFSET": bad or " "})
    assert message.startswith("SCAIWAVE_CLOCK_OFFSET: expected a duration")


def test_clock_offset_may_be_negative_but_refetch_interval_not(env: dict[str, str]) -> None:
    assert load_config({**env, "SCAIWAVE_CLOCK_OFFSET": "-90s"}).clock_offset_ms == -90_000
    assert config_error({**env, "SCAIWAVE_KEY_REFETCH_INTERVAL": "0"}).startswith("SCAIWAVE_KEY_REFETCH_INTERVAL")
    assert config_error({**env, "SCAIWAVE_KEY_REFETCH_INTERVAL": "-1s"}).startswith("SCAIWAVE_KEY_REFETCH_INTERVAL")


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("0", False), ("off", False)])
def test_skip_verify_flag(env: dict[str, str], value: str, expected: bool) -> None:
    assert load_config({**env, "SCAIWAVE_INSECURE_SKIP_TLS_VERIFY": value}).insecure_skip_tls_verify is expected


# -- one clear line per bad setting ------------------------------------------------


@pytest.mark.parametrize(
    "setting", ["SCAIWAVE_SERVER_NAME", "SCAIWAVE_TLS_CERT", "SCAIWAVE_TLS_KEY", "SCAIWAVE_ADMIN_TOKEN"]
)
def test_each_required_setting(env: dict[str, str], setting: str) -> None:
    del env[setting]
    assert config_error(env).startswith(f"{setting} is not set")
    assert config_error({**env, setting: ""}).startswith(f"{setting} is not set")  # empty = unset


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("SCAIWAVE_LISTEN", "abc", "SCAIWAVE_LISTEN: expected host:port, got 'abc'"),
        ("SCAIWAVE_LISTEN", "::1:80", "SCAIWAVE_LISTEN: expected host:port, got '::1:80'"),
        ("SCAIWAVE_TLS_CERT", "/x/y.pem", "SCAIWAVE_TLS_CERT: file not found: /x/y.pem"),
        ("SCAIWAVE_TLS_KEY", "/x/y.key", "SCAIWAVE_TLS_KEY: file not found: /x/y.key"),
        ("SCAIWAVE_CA_BUNDLE", "/x/ca.pem", "SCAIWAVE_CA_BUNDLE: file not found: /x/ca.pem"),
        ("SCAIWAVE_ADMIN_TOKEN", "short", "SCAIWAVE_ADMIN_TOKEN: too short (5 characters, need at least 16)"),
        ("SCAIWAVE_RECORD", "/no/such/dir/rec", "SCAIWAVE_RECORD: directory does not exist: /no/such/dir"),
        ("SCAIWAVE_INSECURE_SKIP_TLS_VERIFY", "maybe", "SCAIWAVE_INSECURE_SKIP_TLS_VERIFY: expected 1 or 0"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], setting: str, value: str, expected: str) -> None:
    assert config_error({**env, setting: value}).startswith(expected)


def test_data_dir_that_is_a_file(env: dict[str, str], files: dict[str, Path]) -> None:
    message = config_error({**env, "SCAIWAVE_DATA_DIR": str(files["cert"])})
    assert message.startswith("SCAIWAVE_DATA_DIR: not a directory")


def test_tls_cert_that_is_a_directory(env: dict[str, str], tmp_path: Path) -> None:
    assert config_error({**env, "SCAIWAVE_TLS_CERT": str(tmp_path)}).startswith("SCAIWAVE_TLS_CERT: not a file")


# -- TOML ------------------------------------------------------------------------


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_toml_file_and_env_override(env: dict[str, str], files: dict[str, Path], tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path / "scaiwave.toml",
        f"""
server_name = "your-host.test"
listen = "127.0.0.1:8448"
tls_cert = "{files['cert'].name}"   # relative to the file's directory
tls_key = "{files['key']}"
admin_token = "{TOKEN}"
resolve = ["peer.test:8449:127.0.0.1", "x.test:443:[::1]"]
clock_offset = 1500
key_refetch_interval = "2m"
insecure_skip_tls_verify = true
data_dir = "data"
""",
    )
    config = load_config({}, toml)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8448)
    assert config.tls_cert == files["cert"]
    assert config.data_dir == tmp_path / "data"
    assert config.resolve == {("peer.test", 8449): "127.0.0.1", ("x.test", 443): "::1"}
    assert config.clock_offset_ms == 1500 and config.key_refetch_interval_ms == 120_000
    assert config.insecure_skip_tls_verify is True
    assert config.ca_bundle is None

    overridden = load_config({"SCAIWAVE_LISTEN": "0.0.0.0:9999", "SCAIWAVE_RESOLVE": "a.test:1:1.1.1.1"}, toml)
    assert overridden.listen_port == 9999
    assert overridden.resolve == {("a.test", 1): "1.1.1.1"}
    assert overridden.server_name == "your-host.test"  # not overridden: from the file


def test_toml_named_by_env(env: dict[str, str], tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", 'resolve = "peer.test:8449:127.0.0.1"\nlisten = "[::]:8448"\n')
    config = load_config({**env, "SCAIWAVE_CONFIG": str(toml)})
    assert config.resolve == {("peer.test", 8449): "127.0.0.1"}
    assert config.listen_host == "::"


def test_toml_errors(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert config_error(env, missing) == f"SCAIWAVE_CONFIG: file not found: {missing}"
    broken = write_toml(tmp_path / "broken.toml", "listen = \n")
    assert config_error(env, broken).startswith(f"SCAIWAVE_CONFIG: invalid TOML in {broken}")
    typo = write_toml(tmp_path / "typo.toml", 'server_nmae = "x.test"\n')
    assert config_error(env, typo).startswith("SCAIWAVE_CONFIG: unknown setting 'server_nmae'")
    wrong_type = write_toml(tmp_path / "type.toml", "listen = 8448\n")
    message = config_error(env, wrong_type)
    assert message.startswith("SCAIWAVE_LISTEN: expected a string, got 8448")
    assert f"(from 'listen' in {wrong_type})" in message
    bad = write_toml(tmp_path / "bad.toml", 'key_refetch_interval = "soon"\n')
    assert f"(from 'key_refetch_interval' in {bad})" in config_error(env, bad)


def test_toml_missing_required(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", 'server_name = "your-host.test"\n')
    assert config_error({}, toml).startswith("SCAIWAVE_TLS_CERT is not set")


# -- certificates ------------------------------------------------------------------


def tls_error(config: Config) -> str:
    with pytest.raises(ConfigError) as info:
        server_ssl_context(config)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_good_certificate(env: dict[str, str]) -> None:
    ctx = server_ssl_context(load_config(env))
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_certificate_for_another_name(env: dict[str, str], files: dict[str, Path], ca: trustme.CA) -> None:
    cert, key = write_cert(files["dir"], ca, "other.test", stem="other")
    config = load_config({**env, "SCAIWAVE_TLS_CERT": str(cert), "SCAIWAVE_TLS_KEY": str(key)})
    message = tls_error(config)
    assert message.startswith("SCAIWAVE_TLS_CERT: certificate does not cover server name 'your-host.test'")
    # Skipping verification of peers does not excuse our own name.
    assert tls_error(dataclasses.replace(config, insecure_skip_tls_verify=True)) == message


def test_certificate_with_port_in_server_name(
    env: dict[str, str], files: dict[str, Path], ca: trustme.CA
) -> None:
    cert, key = write_cert(files["dir"], ca, "your-host.test", "127.0.0.1", stem="multi")
    base = {**env, "SCAIWAVE_TLS_CERT": str(cert), "SCAIWAVE_TLS_KEY": str(key)}
    server_ssl_context(load_config({**base, "SCAIWAVE_SERVER_NAME": "your-host.test:8449"}))
    message = tls_error(load_config({**base, "SCAIWAVE_SERVER_NAME": "other.test"}))
    assert "does not cover server name 'other.test'" in message


def test_untrusted_ca(env: dict[str, str]) -> None:
    del env["SCAIWAVE_CA_BUNDLE"]
    config = load_config(env)
    message = tls_error(config)
    assert message.startswith("SCAIWAVE_TLS_CERT: certificate does not chain to a trusted root")
    assert "SCAIWAVE_CA_BUNDLE" in message
    # With verification off the chain is not checked, and the config says so.
    insecure = dataclasses.replace(config, insecure_skip_tls_verify=True)
    server_ssl_context(insecure)
    assert any("NOT verified" in line for line in insecure.warnings())


def test_key_not_matching_certificate(env: dict[str, str], files: dict[str, Path], ca: trustme.CA) -> None:
    _, other_key = write_cert(files["dir"], ca, "your-host.test", stem="other")
    message = tls_error(load_config({**env, "SCAIWAVE_TLS_KEY": str(other_key)}))
    assert message.startswith("SCAIWAVE_TLS_KEY:") and "does not match the certificate" in message


def test_files_that_are_not_pem(env: dict[str, str], files: dict[str, Path]) -> None:
    junk = files["dir"] / "junk.pem"
    junk.write_text("hello\n")
    assert tls_error(load_config({**env, "SCAIWAVE_TLS_CERT": str(junk)})).startswith(
        "SCAIWAVE_TLS_CERT: not a PEM certificate"
    )
    assert tls_error(load_config({**env, "SCAIWAVE_TLS_KEY": str(junk)})).startswith(
        "SCAIWAVE_TLS_KEY: not a PEM private key"
    )
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert tls_error(load_config({**env, "SCAIWAVE_TLS_CERT": str(junk)})).startswith(
        "SCAIWAVE_TLS_CERT: not a valid PEM certificate"
    )
    # The key passed to the cert setting: names the cert.
    assert tls_error(load_config({**env, "SCAIWAVE_TLS_CERT": str(files["key"])})).startswith("SCAIWAVE_TLS_CERT")


def test_certificate_file_removed_after_loading(env: dict[str, str], files: dict[str, Path]) -> None:
    config = load_config(env)
    files["cert"].unlink()
    message = tls_error(config)
    assert message.startswith(f"SCAIWAVE_TLS_CERT: cannot read {files['cert']}")


def test_encrypted_key_is_refused_not_prompted(env: dict[str, str], files: dict[str, Path]) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(files["key"].read_bytes(), password=None)
    encrypted = files["dir"] / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    message = tls_error(load_config({**env, "SCAIWAVE_TLS_KEY": str(encrypted)}))
    assert message.startswith("SCAIWAVE_TLS_KEY: key is encrypted")


def test_client_context(env: dict[str, str]) -> None:
    config = load_config(env)
    ctx = client_ssl_context(config)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    insecure = client_ssl_context(dataclasses.replace(config, insecure_skip_tls_verify=True))
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname


def test_bad_ca_bundle(env: dict[str, str], files: dict[str, Path]) -> None:
    junk = files["dir"] / "junk-ca.pem"
    junk.write_text("not a certificate\n")
    config = load_config({**env, "SCAIWAVE_CA_BUNDLE": str(junk)})
    with pytest.raises(ConfigError, match="^SCAIWAVE_CA_BUNDLE: cannot load certificates"):
        client_ssl_context(config)


def test_expired_certificate(env: dict[str, str], files: dict[str, Path], ca: trustme.CA) -> None:
    import datetime

    cert = ca.issue_cert("your-host.test", not_after=datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc),
                         not_before=datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
    cert_path, key_path = files["dir"] / "old.pem", files["dir"] / "old.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    message = tls_error(load_config({**env, "SCAIWAVE_TLS_CERT": str(cert_path), "SCAIWAVE_TLS_KEY": str(key_path)}))
    assert message.startswith("SCAIWAVE_TLS_CERT: certificate has expired")


# -- limits against hostile peers (issue 16) ------------------------------------------


def test_limits_have_sane_defaults_and_reach_the_core(env: dict[str, str]) -> None:
    from scaiwave_federation.shell.http.limits import limits_of

    config = load_config(env)
    assert (config.federation_rate, config.federation_burst, config.federation_concurrent) == (50, 100, 8)
    assert (config.descriptor_fetches_per_origin, config.descriptor_fetches_total) == (2, 8)
    assert (config.outbound_deadline_ms, config.outbound_per_peer, config.catch_ups_per_peer) == (30_000, 8, 2)
    config = load_config({**env, "SCAIWAVE_FEDERATION_RATE": "5", "SCAIWAVE_OUTBOUND_DEADLINE": "2m",
                          "SCAIWAVE_DESCRIPTOR_FETCHES_TOTAL": "3"})
    limits = limits_of(config)
    assert (limits.rate, limits.burst, limits.fetches_total) == (5, 100, 3)
    assert config.outbound_deadline_ms == 120_000


@pytest.mark.parametrize("setting, value", [
    ("SCAIWAVE_FEDERATION_RATE", "0"), ("SCAIWAVE_FEDERATION_BURST", "-3"), ("SCAIWAVE_OUTBOUND_PER_PEER", "lots"),
    ("SCAIWAVE_CATCH_UPS_PER_PEER", "1.5"), ("SCAIWAVE_DESCRIPTOR_FETCHES_TOTAL", "99999999999"),
    ("SCAIWAVE_OUTBOUND_DEADLINE", "0s"), ("SCAIWAVE_LEASE", "50ms"), ("SCAIWAVE_LEASE", "soon"),
    ("SCAIWAVE_OUTBOX_POLL", "0"),
])
def test_bad_limits_name_their_setting(env: dict[str, str], setting: str, value: str) -> None:
    assert config_error({**env, setting: value}).startswith(f"{setting}: ")


def test_limits_from_toml(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text("federation_concurrent = 3\noutbound_deadline = \"45s\"\n")
    config = load_config(env, path)
    assert config.federation_concurrent == 3 and config.outbound_deadline_ms == 45_000


def test_database_url_is_postgresql_or_unset(env: dict[str, str]) -> None:
    assert load_config(env).database is not None and load_config(env).database_url is None
    url = "postgresql://scaiwave:s3cret@db.internal:5432/scaiwave"
    config = load_config({**env, "SCAIWAVE_DATABASE_URL": url})
    assert config.database == url and "s3cret" not in repr(config)
    message = config_error({**env, "SCAIWAVE_DATABASE_URL": "mysql://root:s3cret@db/x"})
    assert message.startswith("SCAIWAVE_DATABASE_URL: expected a postgresql:// URL") and "s3cret" not in message


def test_worker_settings(env: dict[str, str], tmp_path: Path) -> None:
    config = load_config(env)
    assert (config.lease_ms, config.outbox_poll_ms) == (10_000, 100)
    config = load_config({**env, "SCAIWAVE_LEASE": "1500ms", "SCAIWAVE_OUTBOX_POLL": "20ms"})
    assert (config.lease_ms, config.outbox_poll_ms) == (1500, 20)
    path = tmp_path / "workers.toml"
    path.write_text('lease = "30s"\noutbox_poll = 250\n')
    config = load_config(env, path)
    assert (config.lease_ms, config.outbox_poll_ms) == (30_000, 250)
