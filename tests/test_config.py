import dataclasses
import tomllib
from pathlib import Path

import pytest

from connector.config import DEFAULT_DATABASE_URL, Config, load_config
from connector.errors import ConfigError


def test_defaults_are_the_embedded_sqlite_database_and_no_secret():
    config = load_config({})
    assert config.database_url == DEFAULT_DATABASE_URL == "sqlite:///coherent.db"
    assert config.webhook_secrets == ()
    assert config.max_body_bytes == 1024 * 1024


def test_file_then_environment_then_arguments_take_precedence(tmp_path):
    path = tmp_path / "connector.toml"
    path.write_text('database_url = "sqlite:///from-file.db"\nworkers = 3\nwebhook_secrets = ["a", "b"]\n')
    environ = {"CONNECTOR_CONFIG": str(path)}
    config = load_config(environ)
    assert (config.database_url, config.workers, config.webhook_secrets) == ("sqlite:///from-file.db", 3, ("a", "b"))

    environ |= {"CONNECTOR_DATABASE_URL": "sqlite:///from-env.db", "CONNECTOR_WEBHOOK_SECRETS": "new, old"}
    config = load_config(environ)
    assert config.database_url == "sqlite:///from-env.db"
    assert config.webhook_secrets == ("new", "old")
    assert config.workers == 3

    assert load_config(environ, database_url="sqlite:///explicit.db").database_url == "sqlite:///explicit.db"


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"CONNECTOR_CONFIG": str(tmp_path / "nope.toml")})


def test_unknown_settings_are_refused(tmp_path):
    path = tmp_path / "connector.toml"
    path.write_text("databse_url = 'typo'\n")
    with pytest.raises(ConfigError, match="databse_url"):
        load_config({"CONNECTOR_CONFIG": str(path)})


def test_invalid_values_are_refused():
    with pytest.raises(ConfigError, match="workers"):
        load_config({"CONNECTOR_WORKERS": "many"})
    with pytest.raises(ConfigError, match="log_format"):
        load_config({"CONNECTOR_LOG_FORMAT": "xml"})


def test_require_secrets_says_how_to_configure_one():
    with pytest.raises(ConfigError, match="CONNECTOR_WEBHOOK_SECRETS"):
        load_config({}).require_secrets()


def test_redacted_never_shows_a_secret():
    config = load_config({"CONNECTOR_WEBHOOK_SECRETS": "hunter2"})
    assert "hunter2" not in repr(config.redacted())


def test_the_example_file_loads_and_documents_every_setting():
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    config = load_config({"CONNECTOR_CONFIG": str(example)})
    with example.open("rb") as fh:
        assert set(tomllib.load(fh)) == {field.name for field in dataclasses.fields(Config)}
    defaults = Config()
    for field in dataclasses.fields(Config):
        if field.name != "webhook_secrets":
            assert getattr(config, field.name) == getattr(defaults, field.name), field.name
