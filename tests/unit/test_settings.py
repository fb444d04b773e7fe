from pathlib import Path

import pytest

from prolifscore.cli.main import config_rows
from prolifscore.core.runtime.settings import load
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
