"""A secret read from a file, the one way the service and every command read it."""

from __future__ import annotations

import sys
from pathlib import Path

from receiver.config import ConfigError


def secret_text(raw: bytes, source: str = "secret") -> str:
    """A secret's text, the one way every tool reads it: UTF-8, and one trailing newline (as
    `echo` or an editor leaves it) dropped. Nothing else is trimmed."""
    try:
        value = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{source} is not UTF-8 text") from None
    return value[:-1] if value.endswith("\n") else value


def read_secret_file(path: Path | str, *, dash_is_stdin: bool = False, kind: str = "secret"
                     ) -> str:
    """A secret from a file (`secret_text`). Used by the service's `{file: ...}` settings and by
    every command's `--token-file` / `--key-file`, so a hook URL, a signature and a badge URL
    minted from a file always agree with the service reading the same file. With
    `dash_is_stdin` (the commands), `-` is standard input. `kind` names it in errors."""
    if dash_is_stdin and str(path) == "-":
        return secret_text(sys.stdin.buffer.read(), "standard input")
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} file {path}: {exc.strerror}") from None
    return secret_text(raw, f"{kind} file {path}")
