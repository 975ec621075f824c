"""``harma.io`` (atomic writes, hashing, safetensors reads that fail with our errors) and the one config parser."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import save_file

from harma.config import from_dict
from harma.errors import BaseWeightsError, CheckpointError, ConfigError, HarmaError
from harma.io import atomic_write_json, file_sha256, read_safetensors, safetensors_keys

ROOT = Path(__file__).resolve().parents[1]


def test_io_imports_no_model_code():
    """Writing a file must not load the model stack: harma.io imports the standard library and harma.errors."""
    tree = ast.parse((ROOT / "harma" / "io.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {("." * n.level) + (n.module or "") for n in top if isinstance(n, ast.ImportFrom)}
    assert names == {"__future__", "hashlib", "json", "os", "tempfile", "pathlib", "typing", ".errors"}


def test_atomic_json_and_sha(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"b": [1, 2]})
    assert path.read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind
    assert len(file_sha256(path)) == 64 and file_sha256(path) != file_sha256(__file__)


def test_safetensors_reads_fail_with_our_error_naming_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2, 3), "b": torch.zeros(3)}, str(good))
    assert sorted(read_safetensors(good, CheckpointError)) == ["b", "w"]
    assert list(read_safetensors(good, CheckpointError, keys=["w"])) == ["w"]
    assert sorted(safetensors_keys(good, CheckpointError)) == ["b", "w"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-5])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    for bad, error in ((cut, CheckpointError), (junk, BaseWeightsError), (tmp_path / "gone.safetensors", CheckpointError)):
        with pytest.raises(error, match=bad.name) as info:
            read_safetensors(bad, error)
        assert isinstance(info.value, HarmaError) and "\n" not in str(info.value)
    with pytest.raises(BaseWeightsError, match="junk"):
        safetensors_keys(junk, BaseWeightsError)


@dataclass
class _Inner:
    rate: float = 0.1
    steps: Optional[int] = None


@dataclass
class _Outer:
    name: str = "x"
    flag: bool = False
    inner: _Inner = field(default_factory=_Inner)


def test_one_parser_reads_strings_as_the_declared_types():
    cfg = from_dict(_Outer, {"name": 3, "flag": "yes", "inner": {"rate": "4e-4", "steps": "12"}})
    assert cfg == _Outer(name="3", flag=True, inner=_Inner(rate=4e-4, steps=12))
    assert from_dict(_Outer, {"inner": {"steps": None}}).inner.steps is None
    with pytest.raises(ConfigError, match=r"inner\.rate: cannot read 'fast' as float"):
        from_dict(_Outer, {"inner": {"rate": "fast"}})
    with pytest.raises(ConfigError, match=r"flag: cannot read 'maybe' as bool"):
        from_dict(_Outer, {"flag": "maybe"})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) inner\.rat; valid keys: rate, steps"):
        from_dict(_Outer, {"inner": {"rat": 1}})
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(_Inner, {"steps": 1.5})


def test_app_environment_uses_the_same_parser(tmp_path, monkeypatch, capsys):
    from harma_app import main as app_main
    from harma_app.state import AppConfig

    cfg = AppConfig.from_env({"HARMA_UMAP_POINTS": "200", "HARMA_ALLOW_DOWNLOAD": "1", "HARMA_CACHE": str(tmp_path),
                              "HARMA_DATA": str(tmp_path), "HARMA_SPLIT": ""})
    assert (cfg.umap_points, cfg.allow_download, cfg.cache_dir, cfg.data, cfg.split) == (
        200, True, str(tmp_path), str(tmp_path), None)
    with pytest.raises(ConfigError, match="HARMA_UMAP_POINTS='many': umap_points: cannot read 'many' as int"):
        AppConfig.from_env({"HARMA_UMAP_POINTS": "many"})
    monkeypatch.setenv("HARMA_BATCH_SIZE", "big")  # python app.py --help: a bad variable stops it first
    with pytest.raises(SystemExit) as stop:
        app_main(["--help"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: HARMA_BATCH_SIZE='big': batch_size: cannot read 'big' as int"]
