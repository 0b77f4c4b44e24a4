"""Loading the settings: the YAML file, then `GFB_*` environment overrides, then CLI flags; a
validation error said in one line naming the key, and the variable or flag that set it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from receiver.config import ENV_PREFIX, ConfigError, Settings


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            target[part] = nxt
        target = nxt
    target[path[-1]] = value


def _env_paths(environ: Mapping[str, str]) -> dict[str, list[str]]:
    """Each `GFB_*` override variable and the key path it sets (GFB_CONFIG names the file)."""
    paths = {}
    for name in environ:
        if name.startswith(ENV_PREFIX) and name != ENV_PREFIX + "CONFIG":
            path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
            if path:
                paths[name] = path
    return paths


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`GFB_LISTEN__PORT=9000` -> {"listen": {"port": "9000"}}; YAML-parsed scalars and lists."""
    result: dict[str, Any] = {}
    for name, path in _env_paths(environ).items():
        raw = environ[name]
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        _set_path(result, path, value)
    return result


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_source(loc: tuple[str, ...], env_paths: Mapping[str, list[str]]) -> str | None:
    """The variable that set the value at `loc` (or a mapping holding it), if one did."""
    for name, path in sorted(env_paths.items(), key=lambda item: -len(item[1])):
        if tuple(path) == loc[:len(path)]:
            return name
    return None


def _flag_sets(flags: Mapping[str, Any], loc: tuple[str, ...]) -> bool:
    """Whether a command-line flag set the value at `loc` (or a value holding it)."""
    node: Any = flags
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, Mapping):
            return True
    return bool(loc)


def _format_error(exc: ValidationError, env_paths: Mapping[str, list[str]] | None = None,
                  flags: Mapping[str, Any] | None = None) -> str:
    """One `key: problem` per error; a value that came from the environment names its variable
    (never the value: it may be a secret). A command-line flag wins over the variable."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(root)"
        variable = None if _flag_sets(flags or {}, loc) else _env_source(loc, env_paths or {})
        where = f" (environment variable {variable})" if variable else ""
        lines.append(f"{key}{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    named = "" if path is not None or not environ.get(ENV_PREFIX + "CONFIG") else (
        f" (environment variable {ENV_PREFIX}CONFIG)")
    path = path or (Path(environ[ENV_PREFIX + "CONFIG"]) if named else None)
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(
                f"cannot read configuration file {path}{named}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {path} must hold a mapping")
        data = loaded
    data = _merge(data, env_overrides(environ))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = _merge(data, flags)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, _env_paths(environ), flags)) from None
