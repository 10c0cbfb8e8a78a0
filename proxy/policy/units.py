"""Policy value types: durations (`250ms`, `30s`, `5m`), sizes (`32MiB`), percentages (`20%`), `${ENV}`
interpolation and the credentials a URL may carry (`user:password@`).

Pure parsing, shared by the schema and the CLI; every error message says what a valid value looks like,
never the value itself (it may come from the environment and be a secret).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema
from yarl import URL  # aiohttp's own URL type: parses credentials as the client would

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2, "GB": 1000**3, "GiB": 1024**3,
}
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_duration(value: object) -> float:
    """`250ms`, `30s`, `5m`, `1h` or a bare number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 30s or 5m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    # Never quote the value: it may come from `${VARIABLE}` interpolation and be a secret.
    raise ValueError("invalid duration: use a number with a unit (ms, s, m or h), such as 250ms, 30s or 5m")


def parse_size(value: object) -> int:
    """`32MiB`, `512KB`, `1GiB` or a bare number of bytes -> bytes (int)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 32MiB")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError(  # the value is never quoted (it may be an interpolated secret)
        "invalid size: use a number of bytes or a number with a unit (B, KB, KiB, MB, MiB, GB, GiB), "
        "such as 512KiB or 32MiB"
    )


def parse_percent(value: object) -> float:
    """`20%`, `12.5 %` or a bare number from 0 to 100 -> percent (float)."""
    if isinstance(value, bool):
        raise ValueError("expected a percentage such as 20% or a number from 0 to 100")
    if isinstance(value, str):
        match = _PERCENT.match(value)
        value = float(match.group(1)) if match else None
    if isinstance(value, int | float) and 0 <= value <= 100:
        return float(value)
    raise ValueError("invalid percentage: use a number from 0 to 100, with or without %, such as 20% or 12.5")


def format_duration(seconds: float) -> str:
    """The shortest readable form, for explain output and error messages."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


class UnsetVariable(ValueError):
    """`${NAME}` names an environment variable that is not set and has no `:-default`."""

    def __init__(self, name: str) -> None:
        super().__init__(f"environment variable {name} is not set and has no default (write ${{{name}:-default}})")
        self.name = name


class UnreadableSecretFile(UnsetVariable):
    """`NAME_FILE` names a file that cannot be read as text (the message has its path, never content)."""

    def __init__(self, name: str, path: str, reason: str) -> None:
        ValueError.__init__(self, f"environment variable {name}_FILE names {path}, which cannot be read ({reason})")
        self.name = name


def read_secret_file(name: str, path: str) -> str:
    """The value of `${NAME}` from the file `NAME_FILE` names (a mounted Kubernetes or Docker secret),
    without the one trailing newline editors and `echo` add."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read()
    except OSError as exc:
        raise UnreadableSecretFile(name, path, exc.strerror or type(exc).__name__) from None
    except UnicodeDecodeError:
        raise UnreadableSecretFile(name, path, "not UTF-8 text") from None
    return value.removesuffix("\n").removesuffix("\r")


# A per-process key for `secret_files_fingerprint`: the fingerprint shows a rotation, and nothing else.
_FINGERPRINT_KEY = os.urandom(16)


def secret_files_fingerprint(texts: Iterable[str], environ: Mapping[str, str] | None = None) -> str:
    """A keyed hash of the secret files the policy texts read through `${NAME}` + `NAME_FILE` (what
    `interpolate` would read), so the policy watcher sees a rotated key file (a Kubernetes Secret
    volume updated in place) as a change. Keyed per process: the value never leaves the process
    and cannot be checked against a guessed key. "" when no secret file is read."""
    env = os.environ if environ is None else environ
    paths = sorted({
        (name, env[f"{name}_FILE"])
        for text in texts if "${" in text
        for name, _ in _ENV.findall(text)
        if name not in env and env.get(f"{name}_FILE")
    })
    if not paths:
        return ""
    mac = hmac.new(_FINGERPRINT_KEY, digestmod=hashlib.sha256)
    for name, path in paths:
        try:
            content = Path(path).read_bytes()
        except OSError:
            content = b"\0<unreadable>"
        mac.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return mac.hexdigest()


def interpolate(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace `${NAME}` and `${NAME:-default}`: the variable, else the file `NAME_FILE` names (read at
    every load), else the default; none of them is an error."""
    env = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        path = env.get(f"{name}_FILE")
        if path:
            return read_secret_file(name, path)
        if default is not None:
            return default
        raise UnsetVariable(name)

    return _ENV.sub(substitute, text) if "${" in text else text


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """`scheme://user:password@host/...` -> (the URL without `user:password@`, user, password), the two
    percent-decoded; `(url, None, None)` when the URL carries no credentials (or does not parse: the
    schema refuses such a base_url)."""
    try:
        parsed = URL(url)
    except ValueError:
        return url, None, None
    if parsed.user is None:
        return url, None, None
    return str(parsed.with_user(None)), parsed.user, parsed.password


def mask_userinfo(url: str) -> str:
    """The URL as it may be shown (explain, logs): `user:***@`; a user alone (often a token) is `***@`."""
    try:
        parsed = URL(url)
    except ValueError:
        return url
    if parsed.user is None:
        return url
    if parsed.password is None:
        return str(parsed.with_user("***"))
    return str(parsed.with_password("***"))


# The JSON Schema (for editors) shows what people write, not the parsed float/int.
_DURATION_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"}],
    "description": "a duration: 250ms, 30s, 5m, 1h or a number of seconds",
}
_SIZE_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$"},
    ],
    "description": "a size: 512KiB, 32MiB or a number of bytes",
}
_PERCENT_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0, "maximum": 100},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*%?\s*$"},
    ],
    "description": "a percentage: 20% or a number from 0 to 100",
}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
Percent = Annotated[float, BeforeValidator(parse_percent), WithJsonSchema(_PERCENT_SCHEMA)]
ByteSize = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
