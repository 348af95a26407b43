"""The agent's disk cache and config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeward.actors.cache import AgentCache
from edgeward.actors.config import AgentConfig
from edgeward.actors.core import CacheRecord


def test_cache_record_survives_a_reopen(tmp_path: Path) -> None:
    record = CacheRecord(3, 17, 2, ({"metadata": {"name": "a"}},), b"signed", "abc")
    cache = AgentCache(tmp_path)
    cache.store(record)
    cache.close()
    assert AgentCache(tmp_path).load() == record


def test_empty_or_damaged_cache_loads_as_nothing(tmp_path: Path) -> None:
    assert AgentCache(tmp_path / "new").load() is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cache.sqlite").write_bytes(b"this is not sqlite" * 100)
    assert AgentCache(tmp_path / "bad").load() is None


def test_agent_config_round_trips_and_is_private(tmp_path: Path) -> None:
    config = AgentConfig("pos-1", {"store": "berlin"}, "amqp://x", str(tmp_path), {"k": "v"})
    path = tmp_path / "pos-1.json"
    config.write(path)
    assert AgentConfig.read(path) == config
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"device": "x"}', "missing keys"),
        ('{"device": "x", "colour": 1}', "unknown keys"),
    ],
)
def test_bad_agent_config_is_refused_with_the_reason(tmp_path: Path, text, fragment) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        AgentConfig.read(path)
