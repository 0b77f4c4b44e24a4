"""What every command shares: exit codes, the one-line failure, file arguments."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_OK = 0
EXIT_PAYLOAD = 1  # plan: the payload lacks what routing needs (the service would answer 422)
EXIT_USAGE = 2  # bad arguments, unreadable files, bad configuration or manifests
EXIT_STARTUP = 3  # serve: the service could not start (uvicorn's code for it)
EXIT_PROBLEMS = 1  # doctor: problems found; hook-url --receiver: the Receiver has no usable token


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"gitea-flux-bridge: {message}", file=sys.stderr)
    return code


class UsageError(Exception):
    """A bad argument, said in one line (exit 2)."""


def read_file(path: str, what: str) -> bytes:
    """A file argument's bytes (`-` is standard input); one that cannot be read is a usage error
    naming the file, not a traceback or a bare errno."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror}") from None


def read_token(path: str, what: str = "token") -> str:
    """A token or key file, read as the service and notify-flux read theirs (one trailing
    newline dropped; `-` is standard input): `secret_files.read_secret_file`."""
    from receiver.secret_files import read_secret_file

    return read_secret_file(path, dash_is_stdin=True, kind=what)


def no_kube(exc: ModuleNotFoundError) -> str:
    """The `kube` extra is not installed: only commands that read a real cluster need it."""
    return (f"reading a Kubernetes cluster needs the Kubernetes client ({exc.name} is not "
            "installed): pip install 'gitea-flux-bridge[kube]', or use --manifests DIR")
