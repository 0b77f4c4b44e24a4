"""Configuration: file, environment, flags; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from receiver.config import ConfigError
from receiver.config_load import load_settings
from receiver.secret_files import read_secret_file


def test_defaults_are_safe() -> None:
    s = load_settings(environ={})
    assert s.body_limit_bytes == 3 * 1024 * 1024
    assert s.insecure.allow_unsigned_generic is False
    assert s.insecure.allow_unsigned_events is False
    assert s.listen.host == "127.0.0.1"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("cluster_name: from-file\nlisten: {port: 7000, host: 0.0.0.0}\nnamespaces: [a]\n")
    env = {"GFB_LISTEN__PORT": "7100", "GFB_NAMESPACES": "[x, y]", "GFB_CLUSTER_NAME": "env"}
    s = load_settings(f, environ=env, overrides={"cluster_name": "flag"})
    assert (s.listen.host, s.listen.port) == ("0.0.0.0", 7100)
    assert s.namespaces == ["x", "y"]
    assert s.cluster_name == "flag"


@pytest.mark.parametrize(("doc", "key"), [
    ("listen: {port: 0}", "listen.port"),
    ("body_limit: 5", "body_limit"),
    ("log_level: loud", "log_level"),
    ("gitea: [{name: a, url: ftp://x, token: {file: /t}}]", "gitea.0.url"),
    ("gitea: [{name: a, url: https://x, token: {}}]", "gitea.0.token"),
    ("events: {hmac_token: {secret: no-slash}}", "events.hmac_token"),
])
def test_errors_name_the_key(tmp_path: Path, doc: str, key: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(doc)
    with pytest.raises(ConfigError) as err:
        load_settings(f, environ={})
    assert key in str(err.value)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_settings(tmp_path / "missing.yaml", environ={})
    (tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path / "bad.yaml", environ={})
    with pytest.raises(ConfigError, match="cannot read secret file"):
        read_secret_file(tmp_path / "nope")


def test_secret_file_drops_one_trailing_newline(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("abc\n")
    assert read_secret_file(f) == "abc"
