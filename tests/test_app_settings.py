"""``python app.py``'s settings: a value it cannot use stops it at start with one ``error:`` line naming the
variable or flag, exit code 2 (issue 36), instead of a traceback, a hang or a failure at the first query."""

from __future__ import annotations

import runpy

import pytest

from harma.errors import ConfigError
from harma_app import blocks, common
from harma_app import state as app_state


@pytest.fixture
def no_launch(monkeypatch):
    """``blocks.main`` stops where it would build and serve the UI: these settings must be refused before."""

    def build_demo(config):
        raise AssertionError(f"the app would start with {config}")

    monkeypatch.setattr(blocks, "build_demo", build_demo)
    for var in ("HARMA_MODEL", "HARMA_DEVICE", "HARMA_UMAP_POINTS", "HARMA_BATCH_SIZE", "HARMA_QUERY_CONCURRENCY",
                "HARMA_BANDS", "HARMA_DECODE_MB"):
        monkeypatch.delenv(var, raising=False)


def refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        blocks.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("var, value, says", [
    ("HARMA_QUERY_CONCURRENCY", "abc", "cannot read 'abc'"),
    ("HARMA_QUERY_CONCURRENCY", "0", ">= 1"),  # a pool of 0 served no query, ever
    ("HARMA_BATCH_SIZE", "0", ">= 1"),
    ("HARMA_DEVICE", "quantum", "cpu, cuda"),
    ("HARMA_UMAP_POINTS", "-5", ">= 2"),
    ("HARMA_MODEL", "nope", "unknown model 'nope'"),
    ("HARMA_BANDS", "red", "three 0-based band numbers"),  # both were refused only at the first decode
    ("HARMA_DECODE_MB", "0", "at least 1"),
])
def test_a_variable_it_cannot_use_stops_the_app_at_start(no_launch, monkeypatch, capsys, var, value, says):
    monkeypatch.setenv(var, value)
    err = refused(capsys, [])
    assert f"{var}=" in err and says in err, err


@pytest.mark.parametrize("argv, says", [
    (["--model", "nope"], "--model='nope': unknown model"),
    (["--umap-points", "-5"], "--umap-points=-5"),
    (["--device", "quantum"], "--device='quantum'"),
])
def test_a_flag_it_cannot_use_stops_the_app_at_start(no_launch, capsys, argv, says):
    assert says in refused(capsys, argv)


def test_the_query_pool_is_a_setting_read_at_start(monkeypatch):
    monkeypatch.setenv("HARMA_QUERY_CONCURRENCY", "abc")
    runpy.run_path(common.__file__)  # importing harma_app.common reads no variable (it raised ValueError)
    monkeypatch.setenv("HARMA_QUERY_CONCURRENCY", "3")
    assert app_state.AppConfig.from_env().query_concurrency == 3
    with pytest.raises(ConfigError, match="query_concurrency"):
        app_state.AppConfig(query_concurrency=0)
