"""A kill between any two file operations of a checkpoint swap leaves ``best/`` and ``last/``
recoverable as the previous or the new checkpoint, whole; evaluate never falls back silently."""

from __future__ import annotations

import json
import os
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from harma import HarmaModel, save_adapters
from harma.io import WEIGHTS_NAME
from tests.conftest import TINY_NAME, perturb_, tiny_config
from training import state as state_mod
from training.cli import CliError, resolve_checkpoint
from training.state import find_best, find_last, write_adapters_dir, write_last


class Killed(BaseException):
    pass


def _models():
    torch.manual_seed(0)
    a = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config())
    perturb_(a, seed=1)
    b = HarmaModel(open_clip.create_model(TINY_NAME), tiny_config())
    b.load_state_dict(a.state_dict())
    perturb_(b, seed=2)
    return a, b


def _weights(directory):
    return {k: v.clone() for k, v in load_file(str(directory / WEIGHTS_NAME)).items()}


def _same(x, y):
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _count_ops(fn) -> int:
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(*a, **k):
        calls["n"] += 1
        return real_replace(*a, **k)

    def rmtree(*a, **k):
        calls["n"] += 1
        return real_rmtree(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_mod.os, "replace", replace)
        mp.setattr(state_mod.shutil, "rmtree", rmtree)
        fn()
    return calls["n"]


def _kill_after(n: int, fn) -> bool:
    """Run ``fn`` with the swap's renames/removals killed at operation ``n``; True if it was killed."""
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def gate(real):
        def op(*a, **k):
            if calls["n"] == n:
                raise Killed
            calls["n"] += 1
            return real(*a, **k)
        return op

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_mod.os, "replace", gate(real_replace))
        mp.setattr(state_mod.shutil, "rmtree", gate(real_rmtree))
        try:
            fn()
        except Killed:
            return True
    return False


@pytest.mark.parametrize("which", ["best", "last"])
def test_kill_between_any_two_operations_keeps_a_whole_checkpoint(tmp_path, which):
    a, b = _models()
    run = tmp_path / "run"

    def write(model, directory):
        if which == "best":
            write_adapters_dir(model, directory, extra={"epoch": 1})
        else:
            write_last(model, directory, {"step": 1}, extra={"epoch": 1})

    find = find_best if which == "best" else find_last
    adapters = (lambda d: d) if which == "best" else (lambda d: d / "adapters")
    write(a, run / which)
    old = _weights(adapters(run / which))
    write(b, tmp_path / "ref" / which)
    new = _weights(adapters(tmp_path / "ref" / which))
    n_ops = _count_ops(lambda: write(b, tmp_path / "count" / which)) + 2  # + the steps of an existing target
    seen = set()
    for n in range(n_ops + 1):
        shutil.rmtree(run, ignore_errors=True)
        write(a, run / which)
        killed = _kill_after(n, lambda: write(b, run / which))
        found = find(run)
        assert found == run / which, (n, sorted(p.name for p in run.iterdir()))
        got = _weights(adapters(found))
        assert _same(got, old) or _same(got, new), n
        seen.add("new" if _same(got, new) else "old")
        if killed:  # the next save after a kill works and leaves no stray folders behind
            write(b, run / which)
            assert _same(_weights(adapters(find(run))), new)
            assert sorted(p.name for p in run.iterdir()) == [which]
    assert seen == {"old", "new"}


def test_a_second_kill_after_a_kill_between_the_renames_keeps_a_whole_best(tmp_path):
    """Killed after best/ was moved aside; the next save is killed too, at any of its operations:
    the previous best must not be deleted before the new one is in place."""
    a, b = _models()
    run = tmp_path / "run"
    write_adapters_dir(a, run / "best", extra={"epoch": 1})
    old = _weights(run / "best")
    write_adapters_dir(b, tmp_path / "ref" / "best", extra={"epoch": 2})
    new = _weights(tmp_path / "ref" / "best")
    for n in range(20):  # the kill that falls between the two renames
        assert _kill_after(n, lambda: write_adapters_dir(b, run / "best", extra={"epoch": 2}))
        if not (run / "best").exists():
            break
    aside = tmp_path / "aside"
    shutil.copytree(run, aside)
    for m in range(n + 4):
        shutil.rmtree(run)
        shutil.copytree(aside, run)
        _kill_after(m, lambda: write_adapters_dir(b, run / "best", extra={"epoch": 2}))
        found = find_best(run)
        assert found is not None, m
        assert _same(_weights(found), old) or _same(_weights(found), new), m


def test_evaluate_uses_recovered_best_and_never_falls_back_silently(tmp_path, capsys):
    a, b = _models()
    run = tmp_path / "run"
    write_adapters_dir(a, run / "best", extra={"epoch": 1})
    write_last(b, run / "last", {"step": 1}, extra={"epoch": 2})
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val": {"mR": 1.0}}) + "\n")
    os.replace(run / "best", run / ".best.old")  # as a kill between the two renames leaves it
    assert resolve_checkpoint(run) == (run / "best", "best")
    shutil.rmtree(run / "best")
    with pytest.raises(CliError, match="records validated epochs but best/ is missing"):
        resolve_checkpoint(run)
    (run / "metrics.jsonl").unlink()
    assert resolve_checkpoint(run) == (run / "last" / "adapters", "last")
    assert "no best/ (no epoch validated yet)" in capsys.readouterr().err


def test_save_adapters_in_place_is_untouched(tmp_path):
    a, _ = _models()
    save_adapters(a, tmp_path / "x")
    assert resolve_checkpoint(tmp_path / "x") == (tmp_path / "x", "adapter directory")
