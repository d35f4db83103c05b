"""params.yaml validation: unknown keys and wrong types are one-line errors naming the key."""

from pathlib import Path

import pytest
import yaml

from fct_registry.core.config import load_params
from fct_registry.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.old.embedding_dim == 8 and params.new.embedding_dim == 128
    assert params.protocol.old_classes == [0, 1, 2, 3, 4]
    assert params.evaluation.metric == "l2"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, lambda raw: raw["old"].__setitem__("embeding_dim", 16))
    with pytest.raises(ConfigError, match=r"old\.embeding_dim"):
        load_params(path)


def test_non_numeric_value_is_an_error_naming_key_and_value(tmp_path):
    path = _write(tmp_path, lambda raw: raw["transformation"].__setitem__("lr", "fast"))
    with pytest.raises(ConfigError, match=r"transformation\.lr.*'fast'"):
        load_params(path)


def test_bct_must_embed_into_the_old_space(tmp_path):
    path = _write(tmp_path, lambda raw: raw["bct"]["backbone"].__setitem__("embedding_dim", 32))
    with pytest.raises(ConfigError, match="must equal old.embedding_dim"):
        load_params(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_error_message_is_one_line(tmp_path):
    path = _write(tmp_path, lambda raw: raw.__setitem__("evaluation", {"metric": "L1"}))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "\n" not in str(info.value) and "evaluation.metric" in str(info.value)
