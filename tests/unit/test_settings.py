from pathlib import Path

import pytest

from prolifscore.cli.main import all_settings, config_rows
from prolifscore.core.runtime.settings import KafkaSettings, describe, load, to_env
from prolifscore.filtering.config import FilteringSettings
from prolifscore.tiling.config import TilingSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_environment_reaches_nested_settings():
    env = {
        "PROLIF_KAFKA_BOOTSTRAP": "kafka:9092",
        "PROLIF_SLIDE_ROOTS": "/a, /b",
        "PROLIF_TISSUE_THRESHOLD": "0.75",
        "PROLIF_TILING_GROUP": "g",
    }
    s = load(TilingSettings, environ=env)
    assert s.kafka.bootstrap_servers == "kafka:9092"
    assert [str(p) for p in s.runtime.slide_roots] == ["/a", "/b"]
    assert s.preprocess.tissue_threshold == 0.75 and s.group_id == "g"
    assert s.runtime.bind_host == "127.0.0.1"  # loopback unless configured


def test_bad_value_names_the_variable():
    with pytest.raises(ValueError, match="PROLIF_FILTER_WORKERS"):
        load(FilteringSettings, environ={"PROLIF_FILTER_WORKERS": "many"})


def test_readme_documents_every_variable():
    text = README.read_text()
    missing = [var for var, *_ in config_rows() if f"`{var}`" not in text]
    assert not missing, f"README configuration table lacks {missing}"


@pytest.mark.parametrize("name", sorted(all_settings()))
def test_to_env_is_what_load_reads_back(name):
    cls = all_settings()[name]
    default = load(cls, environ={})
    assert set(to_env(default)) == {var for var, _, _ in describe(cls)}
    changed = {
        "PROLIF_KAFKA_BOOTSTRAP": "kafka:9092",
        "PROLIF_SLIDE_ROOTS": "/a,/b",
        "PROLIF_TISSUE_THRESHOLD": "0.75",
        "PROLIF_SHUTDOWN_GRACE_S": "2.5",
        "PROLIF_GRPC_PORT": "50051",
    }
    changed = {var: value for var, value in changed.items() if var in to_env(default)}
    settings = load(cls, environ=changed)
    assert settings != default and load(cls, environ=to_env(settings)) == settings
    for var, value in changed.items():
        assert to_env(settings)[var] == value


def test_to_env_of_kafka_settings_names_every_kafka_variable():
    k = load(KafkaSettings, environ={}, topic_status="t.status", partitions=3)
    env = to_env(k)
    assert env["PROLIF_TOPIC_STATUS"] == "t.status" and env["PROLIF_TOPIC_PARTITIONS"] == "3"
    assert env["PROLIF_KAFKA_CONNECT_TIMEOUT_S"] == "120.0"
    assert load(KafkaSettings, environ=env) == k
