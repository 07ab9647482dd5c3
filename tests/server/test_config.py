"""Server settings: the objects the engine and the schedulers are built from, and the
deprecated ``batching`` setting, still read and mapped onto ``policy``."""

from __future__ import annotations

import logging
import platform

import pytest

from server.config import EngineConfig, ServerConfig, parse_config
from server.scheduling import SchedulerConfig, StaticBatching, policy_class


def test_the_engine_and_scheduler_settings_are_built_once_from_the_servers():
    config = parse_config(
        [
            "--max-batch",
            "32",
            "--max-queued-items",
            "100",
            "--policy",
            "fifo",
            "--max-delay-ms",
            "20",
            "--default-priority",
            "3",
            "--guaranteed-share",
            "0.5",
            "--lower-level-share",
            "0.2",
            "--client-queue-share",
            "0.3",
            "--auto-headroom",
            "0.75",
            "--step-graphs",
            "on",
        ]
    )
    assert config.engine() == EngineConfig(
        scheduler=SchedulerConfig(
            max_batch=32,
            max_queued=100,
            policy="fifo",
            max_delay=0.020,
            default_priority=3,
            guaranteed_share=0.5,
            lower_level_share=0.2,
            client_queue_share=0.3,
            auto_headroom=0.75,
        ),
        step_graphs=True,
    )
    assert ServerConfig().engine().scheduler.policy == "fair" and not ServerConfig().engine().step_graphs


@pytest.mark.parametrize("name", ["fair", "fifo", "static"])
def test_policy_takes_every_registered_name(name):
    assert parse_config(["--policy", name]).engine().scheduler.policy == name


def test_an_unknown_policy_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--policy", "dynamic"])
    assert "policy must be one of fair, fifo, static; got 'dynamic'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="policy must be one of fair, fifo, static"):
        ServerConfig(policy="round_robin")


def _from(source: str, value: str, tmp_path, monkeypatch) -> list[str]:
    """Arguments that give ``batching = value`` from ``source`` (a flag, the environment or a file)."""
    if source == "flag":
        return ["--batching", value]
    if source == "environment":
        monkeypatch.setenv("ODESERVE_BATCHING", value)
        return []
    path = tmp_path / "server.toml"
    path.write_text(f'batching = "{value}"\n')
    return ["--config", str(path)]


@pytest.mark.parametrize("source", ["flag", "environment", "file"])
def test_the_deprecated_batching_setting_maps_to_the_same_policy_and_warns(source, tmp_path, monkeypatch, caplog):
    expected = parse_config(["--policy", "static"])
    with caplog.at_level(logging.WARNING, logger="server.config"):
        config = parse_config(_from(source, "static", tmp_path, monkeypatch))
    assert config == expected and config.engine() == expected.engine()
    assert policy_class(config.engine().scheduler.policy) is StaticBatching
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "batching = 'static' is deprecated" in caplog.text and "policy = 'static'" in caplog.text


@pytest.mark.parametrize("source", ["flag", "environment", "file"])
def test_deprecated_continuous_batching_keeps_the_policy_and_warns(source, tmp_path, monkeypatch, caplog):
    expected = parse_config(["--policy", "fifo"])
    with caplog.at_level(logging.WARNING, logger="server.config"):
        config = parse_config([*_from(source, "continuous", tmp_path, monkeypatch), "--policy", "fifo"])
    assert config == expected
    assert "batching = 'continuous' is deprecated" in caplog.text


def test_static_batching_overrides_policy_as_it_did(caplog):
    """Before ``policy`` took ``static``, ``batching = "static"`` won over any policy."""
    assert parse_config(["--batching", "static", "--policy", "fifo"]).policy == "static"


def test_an_invalid_batching_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--batching", "dynamic"])
    assert "batching (deprecated: use policy) must be continuous or static, got 'dynamic'" in capsys.readouterr().err


def test_batching_is_no_longer_a_listed_setting(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    help_text = capsys.readouterr().out
    assert "--batching" not in help_text and "--policy" in help_text and "static" in help_text
    assert "batching" not in ServerConfig().as_dict()


def test_keep_freed_memory_is_on_or_off(capsys):
    assert ServerConfig().keep_freed_memory == "on"
    assert parse_config(["--keep-freed-memory", "off"]).keep_freed_memory == "off"
    with pytest.raises(SystemExit):
        parse_config(["--keep-freed-memory", "yes"])
    assert "keep_freed_memory must be off or on, got 'yes'" in capsys.readouterr().err


def test_the_server_keeps_freed_memory_by_default(server):
    if platform.libc_ver()[0] == "glibc":
        said = "keep_freed_memory: glibc's malloc serves blocks up to 32 MiB from its heaps"
    else:  # only glibc's malloc takes these settings: the server says it left them alone
        said = "keep_freed_memory: glibc's malloc settings left as they are (the C library is not glibc)"
    assert said in server.log.read_text()
