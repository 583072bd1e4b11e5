"""Which `Host:` names the API answers: the guard against DNS rebinding.

A web page the user opens can point its own name (attacker.example) at 127.0.0.1; the browser then sends
the page's requests to the keyless API on loopback as if it were the page's own site, and reads the answers.
Those requests still say `Host: attacker.example`, so a server bound to loopback answers only loopback names
(localhost, 127.0.0.1, [::1], any port), as Ollama and llama-swap do, plus the names the operator allows
(`api.allowed_hosts` in app.yaml, `chorus api --allowed-host`); `*` allows any name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

ANY = "*"
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
MAX_HEADER_CHARS = 300  # longer Host values are refused unread


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def allowed_host_entry(entry: object) -> str:
    """One allowed-host entry as it is compared (lower case, no brackets, no trailing dot), or ValueError
    saying what is wrong with it: a name or an address, without a scheme, path or port."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"an allowed host must be a non-empty host name or address, got {entry!r}")
    text = entry.strip().lower()
    if text == ANY:
        return ANY
    if "/" in text:
        raise ValueError(f"{entry!r}: give a host name or address, not a URL")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if ":" in bare:
        raise ValueError(f"{entry!r}: give the host without a port (any port is accepted)")
    name = bare.rstrip(".")
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise ValueError(f"{entry!r} is not a valid host name or address")
    return name


def header_host(value: str | None) -> str | None:
    """The host of a `Host:` header value (`name`, `name:port`, `1.2.3.4:port`, `[::1]:port`), normalised as
    `allowed_host_entry` does; None for a missing or malformed value."""
    if not value or len(value) > MAX_HEADER_CHARS:
        return None
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not re.fullmatch(r":\d{1,5}", text[end + 1:])):
            return None
        host = text[1:end]
    else:
        host, _, port = text.partition(":")
        if port and not port.isdigit():
            return None
    try:
        return allowed_host_entry(host) if host != ANY else None
    except ValueError:
        return None


@dataclass(frozen=True)
class HostPolicy:
    """The `Host:` names a server answers. `names` None: any name (a server beyond loopback, which needs a key)."""

    names: frozenset[str] | None

    @classmethod
    def for_bind(cls, bind_host: str, configured: Iterable[str] | None) -> HostPolicy:
        """Loopback names always; plus `configured` when given; any name when `configured` has `*`, or when
        nothing is configured and the server listens beyond loopback."""
        if configured is None:
            return cls(frozenset() if is_loopback(bind_host) else None)
        names = frozenset(allowed_host_entry(entry) for entry in configured)
        return cls(None if ANY in names else names)

    def allows(self, header: str | None) -> bool:
        if self.names is None:
            return True
        host = header_host(header)
        return host is not None and (is_loopback(host) or host in self.names)

    def describe(self) -> str:
        extra = sorted(self.names or ())
        return "localhost, 127.0.0.1, [::1]" + "".join(f", {name}" for name in extra)
