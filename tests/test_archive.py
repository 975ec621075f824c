"""The archive index (format 2): built in partitions, lists on disk, memory-mapped when loaded."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch

from harma.errors import ConfigError, IndexFormatError, InputError
from harma.retrieval import ArchiveIndex, EmbeddingIndex, IndexPlan, build_archive, load_index

N, DIM = 6000, 32
FLAT = IndexPlan("ivf_flat", nlist=32, nprobe=4, train_size=N)
PQ = IndexPlan("ivf_pq", nlist=32, pq_m=4, refine="sq8", nprobe=4, rerank=64, train_size=N)
IDS = [f"tuile/é_{i}.tif" if i % 3 else f"日本/{i}🛰.png" for i in range(N)]


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 60 random centres (as real embeddings cluster by content)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((60, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 60, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


DATA = clustered(N, 1)
QUERIES = clustered(50, 2)


def chunks(x=DATA, size=1000):
    return lambda: (x[i: i + size] for i in range(0, len(x), size))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both kinds over the same rows, in three partitions each."""
    root = tmp_path_factory.mktemp("archive")
    out, threads = {}, faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means on tiny sets: threads only wait for each other on a shared CPU
    try:
        for name, plan in (("flat", FLAT), ("pq", PQ)):
            out[name] = build_archive(root / name, chunks(), N, DIM, plan, IDS, partition_rows=2500,
                                      extra={"kind": "images", "root": str(root / "images")})
    finally:
        faiss.omp_set_num_threads(threads)
    return out


def exact_top10(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]


@pytest.mark.parametrize("name", ["flat", "pq"])
def test_recall_against_exact_search_above_floor(built, name):
    index = built[name]
    _, rows = index.search(torch.from_numpy(QUERIES), 10)
    exact = exact_top10(DATA, QUERIES)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(rows.numpy(), exact)])
    assert recall >= 0.9, recall
    assert index.search_info["recall_at_10"] >= 0.9  # measured at build time, stored
    meta = json.loads((index.path / "index.json").read_text())
    assert meta["format_version"] == 2 and meta["count"] == N and meta["search"]["nprobe"] == index.nprobe


def test_on_disk_index_equals_the_same_index_in_memory(built):
    """The partitioned, merged, memory-mapped index answers as its own trained quantisers with every
    row added at once to lists in memory (and, for ivf_pq, faiss's IndexRefine over SQ8 codes in memory)."""
    for name in ("flat", "pq"):
        index = built[name]
        memory = faiss.read_index(str(index.path / "ivf.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
        ivf = faiss.extract_index_ivf(memory)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns (and frees) them now
        ivf.ntotal = memory.ntotal = 0
        memory.add_with_ids(DATA, np.arange(N))
        ivf.nprobe = index.nprobe
        if name == "flat":
            want_scores, want_rows = memory.search(QUERIES, 10)
        else:
            sq = faiss.read_index(str(index.path / "sq8.faiss"))
            sq.add(DATA)
            refine = faiss.IndexRefine(memory, sq)
            refine.k_factor = index.rerank / 10
            want_scores, want_rows = refine.search(QUERIES, 10)
        scores, rows = index.search(torch.from_numpy(QUERIES), 10)
        assert (rows.numpy() == want_rows).mean() > 0.99  # equal, but for the order of near-ties
        np.testing.assert_allclose(np.sort(scores.numpy(), 1), np.sort(want_scores, 1), atol=1e-4)


def test_ids_round_trip_and_rows_shape(built):
    index = built["pq"]
    assert len(index) == N and index.dim == DIM
    assert index.id(0) == IDS[0] and index.id(N - 1) == IDS[-1]
    assert index.ids_of(torch.tensor([5, 3, 4])) == [IDS[5], IDS[3], IDS[4]]
    scores, rows = index.search(torch.from_numpy(QUERIES[0]), 7)
    assert scores.shape == rows.shape == (7,) and rows.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.all(scores[:-1] >= scores[1:])
    with pytest.raises(IndexError):
        index.id(N)


def test_moved_folder_loads_and_search_params_are_saved(built, tmp_path):
    # the lists file is recorded where the build put it (faiss names that path at every load), not in the
    # build's temporary folder
    recorded = (built["pq"].path / "ivf.faiss").read_bytes()
    assert str(built["pq"].path / "lists.ivfdata").encode() in recorded and b".archive-" not in recorded
    moved = tmp_path / "elsewhere"
    shutil.copytree(built["pq"].path, moved)
    index = load_index(moved, nprobe=8)
    assert isinstance(index, ArchiveIndex) and index.nprobe == 8
    index.rerank = 128
    index.save_search_params()
    again = ArchiveIndex.load(moved)
    assert (again.nprobe, again.rerank) == (8, 128)
    assert again.search_info["measured_with"] == built["pq"].search_info["measured_with"]
    q = torch.from_numpy(QUERIES)
    built["pq"].nprobe, built["pq"].rerank = 8, 128
    assert torch.equal(again.search(q, 10)[1], built["pq"].search(q, 10)[1])


def test_image_path_refuses_ids_outside_the_root(tmp_path):
    ids = ["a/ok.png", "../escape.png", "/etc/passwd"] + [f"{i}.png" for i in range(997)]
    x = clustered(1000, 3)
    index = build_archive(tmp_path / "ix", chunks(x), 1000, DIM, IndexPlan("ivf_flat", nlist=4, nprobe=4), ids,
                          extra={"root": str(tmp_path / "images")})
    assert index.image_path(0) == tmp_path / "images" / "a" / "ok.png"
    for row in (1, 2):
        with pytest.raises(IndexFormatError, match="outside the index's image root"):
            index.image_path(row)
    assert index.image_path(1, follow_links=True) == tmp_path / "images" / "../escape.png"
    index.extra = {}
    with pytest.raises(IndexFormatError, match="no image root"):
        index.image_path(0)


def test_load_index_dispatches_by_format(built, tmp_path):
    EmbeddingIndex(["a", "b"], torch.randn(2, 4)).save(tmp_path / "v1")
    assert isinstance(load_index(tmp_path / "v1"), EmbeddingIndex)
    with pytest.raises(IndexFormatError, match="load_index"):
        EmbeddingIndex.load(built["flat"].path)
    (tmp_path / "v9").mkdir()
    (tmp_path / "v9" / "index.json").write_text('{"format_version": 9}')
    with pytest.raises(IndexFormatError, match="format 9"):
        load_index(tmp_path / "v9")
    with pytest.raises(IndexFormatError, match="index.json"):
        load_index(tmp_path / "nothing")


@pytest.mark.parametrize("name,damage", [
    ("refine.sq8", "delete"), ("ids.offsets", "truncate"), ("lists.ivfdata", "delete"), ("ivf.faiss", "garble"),
    ("sq8.faiss", "garble")])
def test_damaged_files_are_named(built, tmp_path, name, damage):
    folder = tmp_path / "ix"
    shutil.copytree(built["pq"].path, folder)
    f = folder / name
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-8])
    else:
        f.write_bytes(b"\x00" * f.stat().st_size)
    with pytest.raises(IndexFormatError, match=name.replace(".", r"\.")):
        ArchiveIndex.load(folder)


def test_bad_input_is_refused(tmp_path):
    plan = IndexPlan("ivf_flat", nlist=4, nprobe=4)
    x = clustered(500, 4)
    with pytest.raises(InputError, match="400 rows in all, expected 500"):
        build_archive(tmp_path / "a", chunks(x[:400]), 500, DIM, plan, IDS[:500])
    with pytest.raises(InputError, match=r"expected \(m, 32\)"):
        build_archive(tmp_path / "b", chunks(x[:, :16]), 500, DIM, plan, IDS[:500])
    with pytest.raises(InputError, match="ids: 499 given for 500 rows"):
        build_archive(tmp_path / "c", chunks(x), 500, DIM, plan, IDS[:499])
    with pytest.raises(ConfigError, match="not 'exact'"):
        build_archive(tmp_path / "d", chunks(x), 500, DIM, IndexPlan("exact"), IDS[:500])
    with pytest.raises(InputError, match="0 rows"):
        build_archive(tmp_path / "e", chunks(x[:0]), 0, DIM, plan, [])
    assert not (tmp_path / "c" / "index.json").exists()
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # the staging folder went too


def test_sq8_decoding_equals_faiss(built):
    from harma.retrieval.archive_store import SQ8Decoder

    sq = faiss.read_index(str(built["pq"].path / "sq8.faiss"))
    decode = SQ8Decoder(sq)
    codes = sq.sa_encode(DATA[:100])
    assert decode.vmin is not None  # the numpy path, not the fallback
    np.testing.assert_allclose(decode(codes), sq.sa_decode(codes), atol=1e-6)


def test_a_build_is_reproducible_and_reports_progress(tmp_path):
    x, plan, seen = clustered(1500, 5), IndexPlan("ivf_flat", nlist=8, nprobe=2), []
    a, b = (build_archive(tmp_path / name, chunks(x, 400), 1500, DIM, plan, IDS[:1500], seed=3,
                          progress=lambda done, n: seen.append((done, n)), partition_rows=700) for name in "ab")
    for f in ("lists.ivfdata", "ids.bin", "ids.offsets"):  # ivf.faiss names its (temporary) folder
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    q = torch.from_numpy(QUERIES)
    assert all(torch.equal(u, v) for u, v in zip(a.search(q, 10), b.search(q, 10)))
    assert seen[:4] == [(400, 1500), (800, 1500), (1200, 1500), (1500, 1500)]
    assert not list((tmp_path / "a").glob(".archive-*"))  # the staging folder is gone


def test_tuning_stops_at_the_time_budget(built):
    """Recall cannot reach an unreachable target: without a time budget the tuning raises the
    parameters to their caps; with a budget no setting meets, it keeps the plan's first one."""
    from harma.retrieval.archive_tune import ExactTopK, tune

    index, rows = built["pq"], np.arange(0, N, 60)
    exact = ExactTopK(DATA[rows], 11)
    exact.add(0, DATA)
    start = (index.nprobe, index.rerank)
    try:
        index.nprobe, index.rerank = PQ.nprobe, PQ.rerank
        free = tune(index, DATA[rows], exact.best_first(), rows, 1.01, 1e9, lambda _m: None)
        said = []
        index.nprobe, index.rerank = PQ.nprobe, PQ.rerank
        tight = tune(index, DATA[rows], exact.best_first(), rows, 1.01, 0.0, said.append)
    finally:
        index.nprobe, index.rerank = start
    assert free["measured_with"]["stopped_by"] == "nprobe cap 16" and free["nprobe"] == 16
    assert free["recall_at_10"] >= tight["recall_at_10"]
    assert (tight["nprobe"], tight["rerank"]) == (PQ.nprobe, PQ.rerank)
    assert "ms > 0 ms" in tight["measured_with"]["stopped_by"] and "kept nprobe 4" in said[-1]


def test_refine_codes_read_in_parallel_keep_the_order_asked(tmp_path):
    from harma.retrieval.archive_store import PARALLEL_FROM, RefineCodes

    codes = np.random.default_rng(0).integers(0, 256, (3000, 8), dtype=np.uint8)
    (tmp_path / "refine.sq8").write_bytes(codes.tobytes())
    store = RefineCodes(tmp_path / "refine.sq8", 3000, 8)
    try:
        for m in (PARALLEL_FROM - 1, 4 * PARALLEL_FROM):  # one reader, then several
            rows = np.random.default_rng(m).permutation(3000)[:m]
            assert np.array_equal(store.read(rows), codes[rows])
    finally:
        store.close()
