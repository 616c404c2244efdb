"""The settings parse and check their own values: comma lists, enumerated names, derived paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from blip2_search.settings import Settings


def test_comma_lists_are_parsed_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIP2_API_KEYS", " k1, k2,,")
    monkeypatch.setenv("BLIP2_CORS_ORIGINS", "https://a.example/,http://b.example:8080")
    settings = Settings(_env_file=None)
    assert settings.api_keys == ("k1", "k2")
    assert settings.cors_origins == ("https://a.example", "http://b.example:8080")
    assert Settings(_env_file=None, api_keys="").api_keys == ()
    # What a child process needs to see the same values (search_api's test server, Ray workers).
    assert settings.as_env()["BLIP2_API_KEYS"] == "k1,k2"


@pytest.mark.parametrize(
    "field, value",
    [
        ("cors_origins", "a.example"),
        ("api_keys", "has space"),
        ("dtype", "float8"),
        ("device", "gpu"),
        ("vector_index_kind", "hnsw"),
    ],
)
def test_bad_values_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(_env_file=None, **{field: value})


def test_aliases_overrides_and_derived_paths(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, dtype="fp16", device="")
    assert (settings.dtype, settings.device) == ("float16", None)
    assert settings.resolved_thumbnail_dir == tmp_path / "thumbnails"
    assert settings.resolved_vector_index_dir == tmp_path / "index"
    assert settings.resolved_model_input_dir == tmp_path / "model_inputs"
    assert settings.resolved_indexer_lock == tmp_path / "indexer.lock"
    assert settings.resolved_database_url == f"sqlite:///{(tmp_path / 'catalog.db').resolve()}"
    moved = settings.with_overrides(thumbnail_dir=tmp_path / "t", batch_size=None, store_model_inputs=False)
    assert (moved.resolved_thumbnail_dir, moved.batch_size, moved.resolved_model_input_dir) == (
        tmp_path / "t",
        settings.batch_size,
        None,
    )
    assert (
        settings.with_overrides(database_url="postgres://u@h/db").database_url
        == "postgresql+psycopg://u@h/db"
    )
    with pytest.raises(ValidationError):
        settings.with_overrides(batch_size=0)
