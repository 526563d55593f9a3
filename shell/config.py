"""Daemon configuration: environment variables or a TOML file, checked at start.

Every setting has an environment name (``SCAIWAVE_LISTEN``) and a TOML key (the
same name, lower case, without the prefix: ``listen``). The environment wins
over the file; an empty environment variable counts as unset. The file is named
by the ``toml_path`` argument or else by ``SCAIWAVE_CONFIG``. Relative paths in
the file are taken relative to the file's directory (so a config directory can
be moved as a whole); relative paths in the environment relative to the
current directory.

A missing or wrong setting raises :class:`ConfigError` whose message is one line
that starts with the setting's environment name, so the daemon can print it and
stop. :func:`server_ssl_context` goes further and proves, before the daemon
listens, that peers will accept the certificate: it must cover the server name
and chain to a trusted root (checked with an in-memory TLS handshake).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaiwave_federation.core import canonical_server_name, server_name_problem, split_server_name
from scaiwave_federation.core import Network, parse_networks

from .observe.logs import parse_format, parse_level
from .store.dialect import is_postgres_url, redact_url

__all__ = [
    "Config", "ConfigError", "load_config", "parse_duration_ms", "server_ssl_context", "client_ssl_context",
]

PREFIX = "SCAIWAVE_"
DEFAULT_DATA_DIR = "./scaiwave-data"
DEFAULT_LISTEN = "0.0.0.0:8448"
DEFAULT_KEY_REFETCH_INTERVAL_MS = 30_000
MIN_ADMIN_TOKEN_LENGTH = 16

_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"([+-]?)(\d+)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class ConfigError(Exception):
    """A setting is missing or wrong. ``str(error)`` is one line naming the setting."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        # One line, always: the daemon prints it as is before exiting.
        super().__init__(" ".join(message.split()))
        #: The setting's environment name; by default the message's first word.
        self.setting = setting or re.split(r"[: ]", message, maxsplit=1)[0]


@dataclass(frozen=True)
class Config:
    """The validated daemon configuration (build it with :func:`load_config`)."""

    server_name: str
    data_dir: Path
    listen_host: str
    listen_port: int
    tls_cert: Path
    tls_key: Path
    ca_bundle: Path | None
    resolve: dict[tuple[str, int], str]
    admin_token: str = field(repr=False)
    record_path: Path | None = None
    clock_offset_ms: int = 0
    key_refetch_interval_ms: int = DEFAULT_KEY_REFETCH_INTERVAL_MS
    insecure_skip_tls_verify: bool = False
    outbound_allow: tuple[Network, ...] = ()
    log_format: str = "text"
    log_level: int = 20  # logging.INFO
    #: How long access lines are held and written together (0: each at once).
    access_log_flush_ms: int = 100
    # Limits against hostile or broken peers (core.limits, shell.client; issue 16).
    federation_rate: int = 50
    federation_burst: int = 100
    federation_concurrent: int = 8
    descriptor_fetches_per_origin: int = 2
    descriptor_fetches_total: int = 8
    outbound_deadline_ms: int = 30_000
    outbound_per_peer: int = 8
    catch_ups_per_peer: int = 2
    # Several workers on one database (core.leases, shell.runtime.workers).
    lease_ms: int = 10_000
    outbox_poll_ms: int = 100
    #: ``postgresql://…`` (several workers, or PostgreSQL's operations); None:
    #: SQLite in ``data_dir`` (the default). Hidden from repr: it may hold a password.
    database_url: str | None = field(default=None, repr=False)

    @property
    def database(self) -> Path | str:
        """Where the store lives: :attr:`database_url`, else :attr:`data_dir` (SQLite)."""
        return self.database_url or self.data_dir

    @property
    def server_host(self) -> str:
        """The host part of :attr:`server_name`."""
        return split_server_name(self.server_name)[0]

    @property
    def server_port(self) -> int:
        """The port part of :attr:`server_name` (443 when absent)."""
        return split_server_name(self.server_name)[1]

    @property
    def public_base_url(self) -> str:
        """``https://{server_name}``; server names never carry ``:443`` (see load_config)."""
        return f"https://{self.server_name}"

    def warnings(self) -> list[str]:
        """Human lines for every check turned off and every test setting in effect.

        The daemon logs each one loudly at start; an empty list means a
        production configuration.
        """
        lines = []
        if self.insecure_skip_tls_verify:
            lines.append(
                "SCAIWAVE_INSECURE_SKIP_TLS_VERIFY is set: peers' TLS certificates are NOT "
                "verified; anyone on the network path can impersonate a peer"
            )
        if self.clock_offset_ms:
            lines.append(
                f"SCAIWAVE_CLOCK_OFFSET is set: this daemon's clock is shifted by "
                f"{self.clock_offset_ms} ms (a test setting)"
            )
        if self.outbound_allow:
            lines.append(
                "SCAIWAVE_OUTBOUND_ALLOW is set: federation may connect to these non-public ranges: "
                + ", ".join(str(n) for n in self.outbound_allow)
            )
        for (name, port), address in sorted(self.resolve.items()):
            lines.append(f"SCAIWAVE_RESOLVE: {name}:{port} is sent to {address} instead of DNS")
        if self.record_path is not None:
            lines.append(
                f"SCAIWAVE_RECORD is set: every federation exchange is recorded to {self.record_path}"
            )
        return lines


# -- parsing helpers -----------------------------------------------------------


def parse_duration_ms(value: object, setting: str = "duration", *, allow_negative: bool = False) -> int:
    """Parse ``1500`` (milliseconds), ``"90s"``, ``"2h"``, ``"31d"``… into milliseconds.

    Units: ms, s, m, h, d, w. Takes an int or a string; raises :class:`ConfigError`
    naming ``setting`` when the value is not a duration (or is negative and
    ``allow_negative`` is false).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{setting}: expected a duration like 1500, 90s, 2h or 31d, got {value!r}", setting)
    if isinstance(value, int):
        ms = value
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if match is None:
            raise ConfigError(
                f"{setting}: expected a duration like 1500, 90s, 2h or 31d, got {str(value)!r}", setting
            )
        sign, number, unit = match.groups()
        ms = int(number) * _UNITS_MS[(unit or "ms").lower()]
        ms = -ms if sign == "-" else ms
    if ms < 0 and not allow_negative:
        raise ConfigError(f"{setting}: must not be negative, got {value!r}", setting)
    return ms


def _split_host_port(text: str, *, default_port: int | None) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; raises ValueError."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        ipaddress.IPv6Address(host)  # brackets are only for IPv6 literals
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError("IPv6 addresses need brackets, as in [::1]:8448")
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError("no port")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    """A DNS name (letters, digits, hyphens, dots) or an IP address literal."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def _expect_str(value: object, setting: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{setting}: expected a string, got {value!r}", setting)
    return value


def _parse_server_name(value: object, setting: str) -> str:
    # One canonical spelling per server, the core's (core.names): lower case,
    # no trailing dot, ":443" dropped, no IP literals.
    text = _expect_str(value, setting)
    name = canonical_server_name(text)
    if name is None:
        raise ConfigError(f"{setting}: expected host or host:port (like peer.test:8449), got {text!r}: "
                          f"{server_name_problem(text)}", setting)
    return name


def _parse_networks(value: object, setting: str) -> tuple[Network, ...]:
    """``SCAIWAVE_OUTBOUND_ALLOW``: address ranges, a list or a comma separated string."""
    if isinstance(value, str):
        entries = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, list) and all(isinstance(part, str) for part in value):
        entries = value
    else:
        raise ConfigError(f"{setting}: expected a list of address ranges like 10.0.0.0/8, got {value!r}", setting)
    try:
        return parse_networks(entries)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}", setting) from None


def _parse_listen(value: object, setting: str) -> tuple[str, int]:
    text = _expect_str(value, setting)
    try:
        host, port = _split_host_port(text.strip(), default_port=None)
        if not host or not _valid_host(host.lower()):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{setting}: expected host:port, got {text!r}", setting) from None
    return host, port


def _parse_resolve(value: object, setting: str) -> dict[tuple[str, int], str]:
    """curl ``--resolve`` entries ``name:port:address``, a list or a comma separated string."""
    if isinstance(value, str):
        entries = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list) and all(isinstance(part, str) for part in value):
        entries = [part.strip() for part in value]
    else:
        raise ConfigError(f"{setting}: expected a list of name:port:address, got {value!r}", setting)
    table: dict[tuple[str, int], str] = {}
    for entry in entries:
        name, _, rest = entry.partition(":")
        port_text, _, address = rest.partition(":")
        address = address[1:-1] if address.startswith("[") and address.endswith("]") else address
        try:
            ipaddress.ip_address(address)
            port = int(port_text)
            if not _valid_host(name.lower()) or not 0 < port <= 65535:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"{setting}: expected name:port:address (like peer.test:8449:127.0.0.1), got {entry!r}",
                setting,
            ) from None
        canonical = canonical_server_name(name)
        if canonical is None:
            raise ConfigError(f"{setting}: {name!r} is not a server name: {server_name_problem(name)}", setting)
        table[(canonical.partition(":")[0], port)] = address
    return table


def _parse_database_url(value: object, setting: str) -> str:
    """A ``postgresql://`` URL (or ``postgres://``); SQLite needs no URL (unset: ``data_dir``)."""
    text = _expect_str(value, setting).strip()
    if not is_postgres_url(text) or len(text) > 2000:
        raise ConfigError(f"{setting}: expected a postgresql:// URL (leave it unset for SQLite in "
                          f"SCAIWAVE_DATA_DIR), got {redact_url(text)[:80]!r}", setting)
    return text


def _parse_bool(value: object, setting: str) -> bool:
    text = str(value).strip().lower()
    if isinstance(value, bool):
        return value
    if text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text in ("1", "true", "yes", "on")
    raise ConfigError(f"{setting}: expected 1 or 0 (true or false), got {value!r}", setting)


def _parse_token(value: object, setting: str) -> str:
    token = _expect_str(value, setting).strip()
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{setting}: too short ({len(token)} characters, need at least {MIN_ADMIN_TOKEN_LENGTH})", setting
        )
    return token


def _parse_interval(value: object, setting: str) -> int:
    ms = parse_duration_ms(value, setting)
    if ms <= 0:
        raise ConfigError(f"{setting}: must be more than 0, got {value!r}", setting)
    return ms


def _parse_flush(value: object, setting: str) -> int:
    ms = parse_duration_ms(value, setting)
    if ms > 10_000:
        # Held lines are what a kill -9 loses: at most ten seconds of them.
        raise ConfigError(f"{setting}: must be at most 10s, got {value!r}", setting)
    return ms


def _parse_lease(value: object, setting: str) -> int:
    ms = _parse_interval(value, setting)
    if ms < 100:
        raise ConfigError(f"{setting}: must be at least 100ms (renewed every third of it), got {value!r}", setting)
    return ms


def _parse_count(value: object, setting: str) -> int:
    """A positive integer, from TOML or the environment; at most a million."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or not 0 < int(text) <= 1_000_000:
        raise ConfigError(f"{setting}: expected a whole number from 1 to 1000000, got {value!r}", setting)
    return int(text)


def _path(value: object, setting: str, base: Path | None, kind: str) -> Path:
    """A path setting; relative paths from the TOML file are relative to its directory."""
    path = Path(_expect_str(value, setting)).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if kind == "file" and not path.is_file():
        problem = "not a file" if path.exists() else "file not found"
        raise ConfigError(f"{setting}: {problem}: {path}", setting)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ConfigError(f"{setting}: not a directory: {path}", setting)
    if kind == "new file" and not path.parent.is_dir():
        raise ConfigError(f"{setting}: directory does not exist: {path.parent}", setting)
    return path


def _plain(parse: Any) -> Any:
    return lambda value, setting, base: parse(value, setting)


def _path_of(kind: str) -> Any:
    return lambda value, setting, base: _path(value, setting, base, kind)


_REQUIRED = object()

#: key -> (parser(value, setting, base_dir), default). The TOML key is the key;
#: the environment name is SCAIWAVE_ + the key upper-cased. Order = check order.
_SETTINGS: dict[str, tuple[Any, Any]] = {
    "server_name": (_plain(_parse_server_name), _REQUIRED),
    "data_dir": (_path_of("dir"), Path(DEFAULT_DATA_DIR)),
    # postgresql://user:password@host/db: the store on PostgreSQL (shell/store/postgres_store.py).
    "database_url": (_plain(_parse_database_url), None),
    "listen": (_plain(_parse_listen), _parse_listen(DEFAULT_LISTEN, "")),
    "tls_cert": (_path_of("file"), _REQUIRED),
    "tls_key": (_path_of("file"), _REQUIRED),
    "ca_bundle": (_path_of("file"), None),
    "resolve": (_plain(_parse_resolve), {}),
    # Address ranges outbound federation may reach although they are not
    # public (core.netguard); empty: public addresses only. Logged loudly.
    "outbound_allow": (_plain(_parse_networks), ()),
    "admin_token": (_plain(_parse_token), _REQUIRED),
    "record": (_path_of("new file"), None),
    "clock_offset": (lambda v, s, b: parse_duration_ms(v, s, allow_negative=True), 0),
    "key_refetch_interval": (_plain(_parse_interval), DEFAULT_KEY_REFETCH_INTERVAL_MS),
    "insecure_skip_tls_verify": (_plain(_parse_bool), False),
    "federation_rate": (_plain(_parse_count), 50),
    "federation_burst": (_plain(_parse_count), 100),
    "federation_concurrent": (_plain(_parse_count), 8),
    "descriptor_fetches_per_origin": (_plain(_parse_count), 2),
    "descriptor_fetches_total": (_plain(_parse_count), 8),
    "outbound_deadline": (_plain(_parse_interval), 30_000),
    "outbound_per_peer": (_plain(_parse_count), 8),
    "catch_ups_per_peer": (_plain(_parse_count), 2),
    # Workers sharing one database: how long a worker's leases (delivery to a
    # peer, the singleton jobs) outlive it, and how often each worker reads
    # the outbox rows other workers queued for the peers it delivers to.
    "lease": (_plain(_parse_lease), 10_000),
    "outbox_poll": (_plain(_parse_interval), 100),
    "log_format": (_plain(lambda v, s: parse_format(v, s)), "text"),
    "log_level": (_plain(lambda v, s: parse_level(v, s)), 20),
    "access_log_flush": (_plain(_parse_flush), 100),
}


# -- load_config ---------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"SCAIWAVE_CONFIG: file not found: {path}", "SCAIWAVE_CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"SCAIWAVE_CONFIG: cannot read {path}: {exc.strerror}", "SCAIWAVE_CONFIG") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"SCAIWAVE_CONFIG: invalid TOML in {path}: {exc}", "SCAIWAVE_CONFIG") from None
    unknown = sorted(set(data) - set(_SETTINGS))
    if unknown:
        # Catch typos: a misspelt key would otherwise silently fall back to a default.
        raise ConfigError(
            f"SCAIWAVE_CONFIG: unknown setting {unknown[0]!r} in {path} (known: {', '.join(_SETTINGS)})",
            "SCAIWAVE_CONFIG",
        )
    return data


def load_config(env: Mapping[str, str], toml_path: Path | None = None) -> Config:
    """Build a :class:`Config` from ``env`` (usually ``os.environ``) and a TOML file.

    ``toml_path`` (or else ``env["SCAIWAVE_CONFIG"]``) names the optional file;
    the environment overrides it. Checks that required settings are present,
    that values parse and that named files exist, but does not load
    certificates (see :func:`server_ssl_context`). Raises :class:`ConfigError`
    with one line naming the first bad setting (and the file, if it came from there).
    """
    if toml_path is None and env.get(PREFIX + "CONFIG"):
        toml_path = Path(env[PREFIX + "CONFIG"])
    file_values = _read_toml(Path(toml_path)) if toml_path is not None else {}

    values: dict[str, Any] = {}
    for key, (parse, default) in _SETTINGS.items():
        setting = PREFIX + key.upper()
        if env.get(setting):  # an empty variable counts as unset
            value, base, origin = env[setting], None, ""
        elif key in file_values:
            assert toml_path is not None  # file_values come from it
            value, base, origin = file_values[key], Path(toml_path).parent, f" (from '{key}' in {toml_path})"
        elif default is _REQUIRED:
            raise ConfigError(
                f"{setting} is not set (set it in the environment or as '{key}' in the config file)", setting
            )
        else:
            values[key] = dict(default) if isinstance(default, dict) else default  # no shared dict
            continue
        try:
            values[key] = parse(value, setting, base)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{origin}", setting) from None

    listen_host, listen_port = values.pop("listen")
    return Config(
        listen_host=listen_host,
        listen_port=listen_port,
        record_path=values.pop("record"),
        clock_offset_ms=values.pop("clock_offset"),
        key_refetch_interval_ms=values.pop("key_refetch_interval"),
        outbound_deadline_ms=values.pop("outbound_deadline"),
        lease_ms=values.pop("lease"),
        outbox_poll_ms=values.pop("outbox_poll"),
        access_log_flush_ms=values.pop("access_log_flush"),
        **values,
    )


# -- TLS -----------------------------------------------------------------------

# OpenSSL verify codes that mean "the certificate does not name this host".
_NAME_MISMATCH_CODES = {62, 63, 64}  # X509_V_ERR_HOSTNAME/EMAIL/IP_ADDRESS_MISMATCH


def client_ssl_context(config: Config) -> ssl.SSLContext:
    """The context for connecting to peers: system roots plus ``ca_bundle``.

    Verifies chains and host names (``CERT_REQUIRED``, ``check_hostname``)
    unless ``insecure_skip_tls_verify`` is set, in which case nothing is
    verified (``config.warnings()`` says so; the caller must log it). Raises
    :class:`ConfigError` naming ``SCAIWAVE_CA_BUNDLE`` when the bundle does not load.
    """
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.ca_bundle is not None:
        try:
            ctx.load_verify_locations(cafile=str(config.ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"SCAIWAVE_CA_BUNDLE: cannot load certificates from {config.ca_bundle}: {_reason(exc)}") from None
    if config.insecure_skip_tls_verify:
        ctx.check_hostname = False  # must come before CERT_NONE
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_ssl_context(config: Config) -> ssl.SSLContext:
    """The listener's context, proven acceptable to peers before it is used.

    Loads ``tls_cert`` (chain) and ``tls_key``; TLS 1.2 or later; ALPN
    ``http/1.1``. Then it checks, with in-memory TLS handshakes, that the
    certificate covers ``config.server_host`` and chains to a root that
    :func:`client_ssl_context` trusts (the chain part is skipped under
    ``insecure_skip_tls_verify``; the name is still checked). Raises
    :class:`ConfigError` naming ``SCAIWAVE_TLS_CERT`` or ``SCAIWAVE_TLS_KEY``.
    """
    cert_path, key_path = config.tls_cert, config.tls_key
    cert_pem = _read_pem(cert_path, "SCAIWAVE_TLS_CERT", "-----BEGIN CERTIFICATE-----", "PEM certificate")
    _read_pem(key_path, "SCAIWAVE_TLS_KEY", "PRIVATE KEY-----", "PEM private key")
    try:
        # Parse the certificates alone first, so a broken certificate is not
        # blamed on the key by load_cert_chain's generic "PEM lib" error.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_pem)
    except ssl.SSLError as exc:
        raise ConfigError(f"SCAIWAVE_TLS_CERT: not a valid PEM certificate: {cert_path} ({_reason(exc)})") from None

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        # A passphrase would make OpenSSL prompt on the terminal; refuse instead.
        ctx.load_cert_chain(str(cert_path), str(key_path), password=_no_password)
    except _EncryptedKey:
        raise ConfigError(f"SCAIWAVE_TLS_KEY: key is encrypted (needs a passphrase): {key_path}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"SCAIWAVE_TLS_KEY: key {key_path} does not match the certificate in {cert_path}"
            ) from None
        raise ConfigError(f"SCAIWAVE_TLS_KEY: cannot load key {key_path}: {_reason(exc)}") from None

    host = config.server_host
    # 1. The name, on its own: a client that trusts exactly this certificate
    #    file (partial chains allowed) fails only if the name is not covered.
    #    Checked first so a wrong name is not reported as an untrusted chain.
    name_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    name_ctx.load_verify_locations(cadata=cert_pem)
    name_ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    error = _memory_handshake(ctx, name_ctx, host)
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_code in _NAME_MISMATCH_CODES:
        raise ConfigError(
            f"SCAIWAVE_TLS_CERT: certificate does not cover server name {host!r} ({error.verify_message})")
    if config.insecure_skip_tls_verify:
        return ctx  # the chain is not checked: peers are not verified either (see warnings())
    # 2. The whole chain, exactly as a peer running this daemon would check it.
    error = _memory_handshake(ctx, client_ssl_context(config), host)
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code in (9, 10):  # X509_V_ERR_CERT_NOT_YET_VALID / _HAS_EXPIRED
            raise ConfigError(f"SCAIWAVE_TLS_CERT: {error.verify_message}: {cert_path}")
        raise ConfigError(
            f"SCAIWAVE_TLS_CERT: certificate does not chain to a trusted root ({error.verify_message}; "
            f"add its CA to SCAIWAVE_CA_BUNDLE)")
    if error is not None:
        raise ConfigError(f"SCAIWAVE_TLS_CERT: a TLS handshake with this certificate fails: {_reason(error)}")
    return ctx


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    return getattr(exc, "reason", None) or str(exc)


def _read_pem(path: Path, setting: str, marker: str, what: str) -> str:
    """The file's PEM text (ASCII only: ``cadata`` wants that; comments may not be)."""
    try:
        text = path.read_bytes().decode("ascii", "ignore")
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {_reason(exc)}") from None
    if marker not in text:
        raise ConfigError(f"{setting}: not a {what}: {path}")
    return text


def _memory_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str
) -> ssl.SSLError | None:
    """Run a TLS handshake between two contexts over memory BIOs (no sockets).

    Returns the client's error (verification failures are
    ``ssl.SSLCertVerificationError``), else the server's, else None.
    """
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=host)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):  # a TLS 1.2/1.3 handshake takes 2-3 round trips
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return exc
        s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return exc
        c_in.write(s_out.read())
        if client_done and server_done:
            return None
    return ssl.SSLError("handshake did not finish")
