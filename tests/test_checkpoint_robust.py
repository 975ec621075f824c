"""The library refuses malformed checkpoints and configs with a message naming the file and the field
(issue 36): a malformed ``adapter_config.json``, integer tensors where weights belong, JSON nested
too deep to parse, a config section that is not a mapping, non-finite numbers; and a checkpoint
folder that cannot be written on a full disk leaves the previous one as it was."""

from __future__ import annotations

import errno
import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import training.state as state
from harma import (
    CheckpointError,
    HarmaModel,
    ModelConfig,
    load_adapter_weights,
    load_adapters,
    read_adapter_config,
    save_adapters,
)
from harma.config import ConfigError, from_dict
from harma.data import load_split
from harma.errors import BaseWeightsError, DatasetError, IndexFormatError
from harma.io import CONFIG_NAME, WEIGHTS_NAME, cached_json
from harma.retrieval import EmbeddingIndex
from harma.weights import load_base_weights
from tests.conftest import TINY_NAME, perturb_, tiny_config

DEEP = "[" * 100_000 + "]" * 100_000  # a RecursionError in json.loads


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny HarMA model (perturbed) and its adapter folder."""
    torch.manual_seed(0)
    model = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config())
    perturb_(model)
    return model, save_adapters(model, tmp_path_factory.mktemp("ckpt") / "adapters")


def _good_meta(saved) -> dict:
    return json.loads((saved[1] / CONFIG_NAME).read_text())


# (what to write, text the message must hold besides the file name)
MALFORMED = {
    "null": (None, "expected a JSON object, got null"),
    "list": ([1, 2], "expected a JSON object, got a list"),
    "string": ("harma", "expected a JSON object, got a string"),
    "base_null": ({"base": None}, "field 'base' must be an object, got null"),
    "model_null": ({"model": None}, "field 'model' must be an object, got null"),
    "model_string": ({"model": "ViT-B-32"}, "field 'model' must be an object, got a string"),
    "harma_string": ({"model": {"harma": "x"}}, "model.harma: expected a section"),
    "harma_bad_key": ({"model": {"method": "harma", "harma": {"bottlneck": 8}}}, "model.harma.bottlneck"),
    "no_method": ({"method": "__delete__"}, "missing field 'method'"),
    "unknown_method": ({"method": "lora"}, "field 'method' is 'lora'"),
    "method_list": ({"method": ["harma"]}, "field 'method'"),
    "method_disagrees": ({"method": "mrs"}, "'model.method' is 'harma'"),
    "base_name_list": ({"base": {"model_name": ["x"]}}, "field 'base.model_name' must be a string or null"),
    "base_cfg_string": ({"base": {"model_name": TINY_NAME, "model_cfg": "x"}}, "field 'base.model_cfg'"),
    "extra_list": ({"extra": [1]}, "field 'extra' must be an object, got a list"),
    "params_string": ({"trainable_params": "many"}, "field 'trainable_params'"),
    "future_format": ({"format_version": 99}, "format_version 99 is newer"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_adapter_config_names_file_and_field(saved, tmp_path, case):
    content, expect = MALFORMED[case]
    if isinstance(content, dict):  # a change to the good config
        meta = _good_meta(saved)
        for key, value in content.items():
            if value == "__delete__":
                del meta[key]
            else:
                meta[key] = value
        content = meta
    (tmp_path / CONFIG_NAME).write_text(json.dumps(content))
    with pytest.raises(CheckpointError) as e:
        read_adapter_config(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(e.value) and expect in str(e.value)


def test_the_saved_config_passes(saved):
    assert read_adapter_config(saved[1])["method"] == "harma"


def test_adapter_config_nested_too_deep_is_a_checkpoint_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(DEEP)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_adapter_config(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_tensor_in_adapter_weights_is_refused(saved, tmp_path, dtype):
    model, folder = saved
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    name = sorted(tensors)[0]
    tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_adapter_weights(model, tmp_path)
    assert name in str(e.value) and str(dtype).removeprefix("torch.") in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.trainable_state_dict().items())  # nothing loaded


def test_integer_tensor_in_base_weights_is_refused(tmp_path):
    clip = open_clip.create_model(TINY_NAME)
    sd = {k: v.clone() for k, v in clip.state_dict().items()}
    sd["logit_scale"] = torch.tensor(4, dtype=torch.int64)
    save_file(sd, str(tmp_path / "base.safetensors"))
    with pytest.raises(BaseWeightsError, match="tensor logit_scale has dtype int64"):
        load_base_weights(clip, tmp_path / "base.safetensors")


def test_one_json_reader_names_the_file(tmp_path):
    from harma.io import parse_json, read_json  # new in issue 36; imported here so the other tests run on older code

    deep, bad, digits = tmp_path / "deep.json", tmp_path / "bad.json", tmp_path / "digits.json"
    deep.write_text(DEEP)
    bad.write_bytes(b'{"a": "\xff"}')
    digits.write_text("1" * 5000)
    with pytest.raises(IndexFormatError, match="deep.json: invalid JSON: nested too deeply"):
        read_json(deep, IndexFormatError)
    for path in (bad, digits):
        with pytest.raises(IndexFormatError, match=f"{path.name}: invalid JSON"):
            read_json(path, IndexFormatError)
    with pytest.raises(CheckpointError, match="x.jsonl: line 3, column 2: invalid JSON"):
        parse_json("{]", CheckpointError, "x.jsonl", line=3)
    with pytest.raises(CheckpointError, match="x.json: invalid JSON at line 2, column 1"):
        parse_json("{\n]", CheckpointError, "x.json")


def test_cached_json_recomputes_an_entry_nested_too_deep(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    assert cached_json(deep, lambda: {"fresh": 1}) == {"fresh": 1}  # an unreadable cache entry is recomputed
    assert json.loads(deep.read_text()) == {"fresh": 1}


@pytest.mark.parametrize("data, expect", [
    ({"harma": [1, 2]}, "model.harma: expected a section"),
    ({"temperature_init": "nan"}, "model.temperature_init: expected a finite number, got nan"),
    ({"temperature_init": float("inf")}, "model.temperature_init: expected a finite number"),
    ({"init_seed": True}, "model.init_seed: expected a number"),
    ({"also_train": "norms"}, "model.also_train: expected a list"),
    ({"harma": {"layers": ["a"]}}, "model.harma.layers[0]: cannot read 'a' as int"),
])
def test_from_dict_refuses_wrong_shapes_and_numbers(data, expect):
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        from_dict(ModelConfig, data, "model")


def test_from_dict_reads_list_fields_item_by_item():
    cfg = from_dict(ModelConfig, {"model_name": TINY_NAME, "also_train": ["norms"],
                                  "harma": {**tiny_config().harma.__dict__, "layers": ["0", 1], "towers": ["text"]}})
    assert cfg.also_train == ("norms",) and cfg.harma.layers == [0, 1] and cfg.harma.towers == ("text",)


def test_checkpoint_folder_on_a_full_disk_keeps_the_previous_one(saved, tmp_path, monkeypatch):
    model = saved[0]
    last = tmp_path / "last"
    state.write_last(model, last, {"global_step": 1}, extra={"epoch": 1})
    before = {p.name: p.read_bytes() for p in last.rglob("*") if p.is_file()}

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state, "atomic_write_bytes", full)
    with pytest.raises(OSError) as e:
        state.write_last(model, last, {"global_step": 2}, extra={"epoch": 2})
    assert e.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in last.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary folder left behind
    assert state.read_state(last)["global_step"] == 1


def test_index_and_annotation_json_nested_too_deep_name_the_file(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    (index / "index.json").write_text(DEEP)
    (index / "embeddings.safetensors").write_bytes(b"")
    with pytest.raises(IndexFormatError, match="index.json: invalid JSON: nested too deeply"):
        EmbeddingIndex.load(index)
    for name, text, where in (("train.json", DEEP, "train.json"), ("train.jsonl", "\n" + DEEP, "train.jsonl: line 2")):
        data = tmp_path / name.replace(".", "_")
        data.mkdir()
        (data / name).write_text(text)
        with pytest.raises(DatasetError, match=f"{where}: invalid JSON: nested too deeply"):
            load_split(data, "train")


def test_saved_architecture_that_does_not_build_names_the_field(saved, tmp_path):
    for f in saved[1].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    meta = _good_meta(saved)
    meta["model"]["model_name"] = meta["base"]["model_name"] = "harma-test-never-registered"
    meta["base"]["model_cfg"] = {"embed_dim": "x", "vision_cfg": {"layers": "two"}, "text_cfg": {}}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="field 'base.model_cfg' is not an open_clip architecture"):
        load_adapters(tmp_path)
