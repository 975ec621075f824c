"""``python -m benchmarks.run``: the command runs end to end on small sizes and writes its JSON."""

from __future__ import annotations

import json

from benchmarks.run import format_rows, main


def test_quick_search_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quick", "--only", "search", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["sections"]["search"]["rows"]
    assert {r["search"].split("IVF")[0] for r in rows} == {"exact", "faiss "}
    assert all(r["p50 ms"] > 0 and 0 <= r["recall@10"] <= 1 for r in rows)
    assert "| p50 ms |" in capsys.readouterr().out


def test_unknown_section_or_device_is_an_error(capsys):
    assert main(["--only", "speed"]) == 2
    assert "unknown section" in capsys.readouterr().err
    assert main(["--only", "search", "--quick", "--device", "gpu0"]) == 2  # the trainer's device names
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_format_rows_aligns_union_of_keys():
    text = format_rows([{"a": 1, "b": 0.5}, {"a": 1234567, "c": "x"}])
    lines = text.splitlines()
    assert lines[0].split(" | ") == ["a        ", "b    ", "c"] and "1,234,567" in lines[3]


def test_only_some_sections_keeps_the_others_of_the_same_machine(tmp_path, capsys):
    from benchmarks.run import _merge

    out = tmp_path / "results.json"
    machine = {"cores": 2}
    old = {"machine": machine, "device": "cpu", "quick": False, "total_seconds": 30.0,
           "sections": {"embed": {"rows": [{"a": 1}], "seconds": 10.0}, "app": {"rows": [{"a": 2}], "seconds": 20.0}}}
    out.write_text(json.dumps(old))
    new = {"machine": machine, "device": "cpu", "quick": False, "total_seconds": 5.0,
           "sections": {"app": {"rows": [{"a": 3}], "seconds": 5.0}}}
    merged = _merge(out, new)
    assert merged["sections"]["embed"] == old["sections"]["embed"]
    assert merged["sections"]["app"]["rows"] == [{"a": 3}] and merged["total_seconds"] == 15.0
    # another machine's file is replaced, not merged, and the sections it loses are named
    assert _merge(out, {**new, "machine": {"cores": 16}})["sections"].keys() == {"app"}
    assert "sections embed are not kept" in capsys.readouterr().err
