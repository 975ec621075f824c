"""Building an archive index (:mod:`.archive`) from vectors streamed in chunks, in bounded memory.

Two passes over ``chunks`` (autofaiss's recipe): the first keeps a seeded sample (to train the
quantisers) and a few hundred query rows; the second adds the rows partition by partition to copies
of the trained, empty index, each written to a temporary file, while appending every row's SQ8 code
to ``refine.sq8`` and keeping the exact top-10 of the query rows. faiss's ``OnDiskInvertedLists``
then joins the partitions' lists into one ``lists.ivfdata`` (:func:`merge_lists`, as
``faiss.contrib.ondisk.merge_ondisk``). Peak memory is one partition plus the sample, whatever
``n``. Last, the search parameters are raised step by step until the recall@10 of the query rows
reaches a target (autofaiss's tuning), and ``index.json`` is written.

Coarse quantiser: spherical k-means on the sample; from 1,024 lists a two-level k-means
(sqrt(nlist) clusters, then sub-clusters in each, :func:`split_lists`: a flat k-means of 16,384
centroids on 300k x 512 vectors is about 10^14 flops, hours on 2 cores), and from
:data:`~harma.retrieval.plan.HNSW_QUANTIZER_FROM` lists an HNSW graph over the centroids, so that
assigning 10^7 vectors does not scan every centroid.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from ..errors import ConfigError, InputError
from ..io import INDEX_FILE, atomic_write_json
from .ann import _faiss
from .archive import ARCHIVE_VERSION, IVF_FILE, LISTS_FILE, SQ_FILE, ArchiveIndex
from .archive_store import IDS_FILE, OFFSETS_FILE, REFINE_FILE, write_ids
from .archive_tune import MAX_QUERY_MS, QUERIES, TARGET_RECALL, TOPK, ExactTopK, tune
from .plan import HNSW_M, IndexPlan, train_size

PARTITION_BYTES = 512 << 20  # codes held in memory per partition before it is written
PARTITION_ROWS = 1_000_000
TWO_LEVEL_FROM = 1024  # nlist from which k-means is two-level
KMEANS_ITER = 20
STAGE_PREFIX = ".archive-"  # the temporary folder inside ``out`` a build writes into


def _check(x: Any, dim: int, done: int, n: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise InputError(f"chunks: a chunk of shape {tuple(x.shape)} at row {done:,}, expected (m, {dim})")
    if done + len(x) > n:
        raise InputError(f"chunks: more than the {n:,} rows announced (a chunk at row {done:,} has {len(x):,})")
    return x


def _rows(chunks: Callable[[], Iterable[Any]], n: int, dim: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, chunk)`` over a fresh pass of ``chunks``; checks shapes and the total."""
    done = 0
    for x in chunks():
        x = _check(x, dim, done, n)
        if len(x):
            yield done, x
        done += len(x)
    if done != n:
        raise InputError(f"chunks: {done:,} rows in all, expected {n:,}")


def _pick(chunks: Callable[[], Iterable[Any]], n: int, dim: int, rows: np.ndarray) -> np.ndarray:
    """The vectors of the sorted ``rows``, in one pass."""
    out = np.empty((len(rows), dim), np.float32)
    for start, x in _rows(chunks, n, dim):
        a, b = np.searchsorted(rows, [start, start + len(x)])
        out[a:b] = x[rows[a:b] - start]
    return out


def split_lists(sizes: np.ndarray, nlist: int) -> np.ndarray:
    """Second-level centroids per first-level cluster for a two-level k-means: proportional to the
    cluster's size (largest remainder), at least 1 and at most its size, ``nlist`` in all.

    faiss.contrib.clustering's ``rebalance`` rounds a small cluster down to 0 centroids, which its
    k-means then refuses; skewed collections (a few large scenes, many rare ones) have such clusters.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if nlist > sizes.sum() or nlist < int((sizes > 0).sum()):
        raise ConfigError(f"index plan: {nlist:,} lists for {int(sizes.sum()):,} training vectors in "
                          f"{int((sizes > 0).sum())} clusters")
    share = sizes * nlist / sizes.sum()
    alloc = np.clip(np.floor(share).astype(np.int64), (sizes > 0).astype(np.int64), sizes)
    rest = share - alloc
    while alloc.sum() != nlist:  # at most a few passes: each moves every eligible cluster by one
        if alloc.sum() < nlist:
            room = np.flatnonzero(alloc < sizes)
            pick = room[np.argsort(-rest[room], kind="stable")][: nlist - int(alloc.sum())]
            alloc[pick] += 1
            rest[pick] -= 1
        else:
            room = np.flatnonzero(alloc > 1)
            pick = room[np.argsort(rest[room], kind="stable")][: int(alloc.sum()) - nlist]
            alloc[pick] -= 1
            rest[pick] += 1
    return alloc


def _centroids(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids of the sample; from :data:`TWO_LEVEL_FROM` lists two-level
    (about sqrt(nlist) clusters, then each split into :func:`split_lists` sub-clusters)."""
    faiss = _faiss()
    args = dict(seed=seed, spherical=True, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    if nlist < TWO_LEVEL_FROM:
        km = faiss.Kmeans(x.shape[1], nlist, niter=KMEANS_ITER, **args)
        km.train(x)
        return km.centroids
    top = faiss.Kmeans(x.shape[1], int(round(math.sqrt(nlist))), niter=KMEANS_ITER, **args)
    top.train(x)
    _, assign = top.index.search(x, 1)
    assign = assign.ravel()
    order = np.argsort(assign, kind="stable")
    sizes = np.bincount(assign, minlength=top.k)
    out, start = [], 0
    for c, k in enumerate(split_lists(sizes, nlist)):
        part = x[order[start:start + sizes[c]]]
        start += sizes[c]
        if k == 0:
            continue
        if k == len(part):
            out.append(part)
            continue
        km = faiss.Kmeans(x.shape[1], int(k), niter=KMEANS_ITER, **args)
        km.train(part)
        out.append(km.centroids)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def train_index(plan: IndexPlan, sample: np.ndarray, seed: int = 0) -> tuple[Any, Any]:
    """The trained, empty IVF index of ``plan`` (OPQ, coarse quantiser, PQ) and, for an SQ8 refine
    stage, the trained SQ8 codec (an empty ``IndexScalarQuantizer``), from ``sample`` (normalised rows)."""
    faiss = _faiss()
    n, dim = sample.shape
    if plan.nlist > n:
        raise ConfigError(f"index plan: {plan.nlist:,} lists need at least as many training vectors, got {n:,}")
    ip = faiss.METRIC_INNER_PRODUCT
    opq, x = None, sample
    if plan.kind == "ivf_pq" and plan.opq:
        opq = faiss.OPQMatrix(dim, plan.pq_m)
        opq.train(x)
        x = opq.apply(x)
    quantizer = faiss.IndexHNSWFlat(dim, HNSW_M, ip) if plan.hnsw_quantizer else faiss.IndexFlatIP(dim)
    quantizer.add(_centroids(x, plan.nlist, seed))
    if plan.kind == "ivf_flat":
        ivf = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, ip)
    elif plan.kind == "ivf_pq":
        if dim % plan.pq_m:
            raise ConfigError(f"index plan: pq_m {plan.pq_m} does not divide the dimension {dim}")
        ivf = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_m, 8, ip)
        ivf.pq.cp.seed = seed
    else:
        raise ConfigError(f"an archive index is ivf_flat or ivf_pq, not {plan.kind!r} (exact search: EmbeddingIndex)")
    ivf.own_fields = True
    quantizer.this.disown()
    ivf.train(x)  # the quantiser is full: only the PQ codebooks are trained, on the residuals
    index = ivf
    if opq is not None:
        index = faiss.IndexPreTransform(opq, ivf)
        index.own_fields = True
        ivf.this.disown()
        opq.this.disown()
        index.is_trained = True
    sq = None
    if plan.refine == "sq8":
        sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, ip)
        sq.train(sample)
    return index, sq


def merge_lists(trained: Any, parts: list[str], path: Path, final: Optional[Path] = None) -> None:
    """Join the inverted lists of the partition files ``parts`` into ``path`` (faiss's
    ``OnDiskInvertedLists``) and give them to the empty ``trained`` index. As
    ``faiss.contrib.ondisk.merge_ondisk``, except that the partitions stay owned by their indexes and
    are unmapped when this returns (merge_ondisk leaves them mapped: 1.4 GB at 10^7 rows, PQ128).

    ``final``: where the lists file will lie once the build is done. The index records that path, so
    the line faiss prints on every load ("IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename from A to
    B") names the archive's own folder, not a build folder deleted long ago."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(trained)
    if ivf.ntotal:
        raise ValueError("merge_lists needs an empty trained index")
    readers = [faiss.read_index(p, faiss.IO_FLAG_MMAP) for p in parts]  # mapped, not read
    pointers = faiss.InvertedListsPtrVector()
    for r in readers:
        pointers.push_back(faiss.extract_index_ivf(r).invlists)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    lists.filename = str(final or path)  # only recorded: the lists stay mapped from ``path``
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and closes) them now
    ivf.ntotal = trained.ntotal = total
    del pointers, readers


def _partition_rows(index: Any) -> int:
    """Rows per partition: about :data:`PARTITION_BYTES` of codes and ids (the SQ8 codes go straight
    to their file), at most :data:`PARTITION_ROWS`."""
    per_row = int(_faiss().extract_index_ivf(index).code_size) + 8
    return int(max(10_000, min(PARTITION_ROWS, PARTITION_BYTES // per_row)))


def build_archive(out: Any, chunks: Callable[[], Iterable[Any]], n: int, dim: int, plan: IndexPlan,
                  ids: Iterable[object], *, extra: Optional[dict] = None,
                  progress: Optional[Callable[[int, int], None]] = None, log: Optional[Callable[[str], None]] = None,
                  seed: int = 0, partition_rows: Optional[int] = None,
                  target_recall: float = TARGET_RECALL, max_query_ms: float = MAX_QUERY_MS) -> ArchiveIndex:
    """Build an archive index (format 2) in folder ``out`` and return it, loaded (memory-mapped).

    Args:
        out: folder (created); its index files are replaced, ``index.json`` last.
        chunks: zero-argument callable returning a new iterator of float32 (m, dim) L2-normalised
            arrays, ``n`` rows in all, in row order; called twice (sample pass, add pass).
        n, dim: rows and dimension. plan: an ``ivf_flat`` or ``ivf_pq`` :class:`IndexPlan`.
        ids: ``n`` strings in row order (e.g. image paths relative to ``extra["root"]``).
        extra: JSON-serialisable facts stored in ``index.json`` (model identity, image root, kind).
        progress: ``progress(rows added, n)`` after every chunk of the add pass.
        log: one-line messages (stages, measured recall).
        seed: sampling, k-means and PQ training seed (a build is reproducible).
        partition_rows: rows per partition (default: about 512 MB of codes, at most 10^6).
        target_recall: the recall@10 the search parameters are tuned to reach ...
        max_query_ms: ... without a single-query p50 above this (measured here, on the query rows).

    Raises:
        InputError: ``chunks`` yield another total than ``n``, a chunk of the wrong width, or the ids
            another count. ConfigError: a plan that is not an archive kind, or inconsistent with ``n``.
    """
    faiss = _faiss()
    if n < 1 or dim < 1:
        raise InputError(f"cannot build an archive index of {n} rows of dimension {dim}")
    if plan.kind not in ("ivf_flat", "ivf_pq"):
        raise ConfigError(f"an archive index is ivf_flat or ivf_pq, not {plan.kind!r} (exact search: EmbeddingIndex)")
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{STAGE_PREFIX}*"):  # partitions of an interrupted build: gigabytes at 10^7 rows
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))
    try:
        rng = np.random.default_rng(seed)
        train_rows = np.sort(rng.choice(n, min(n, plan.train_size or train_size(n, plan.nlist)), replace=False))
        query_rows = np.sort(rng.choice(n, min(n, QUERIES), replace=False))
        both = np.union1d(train_rows, query_rows)  # the query rows may train too: one copy of the sample
        sample = _pick(chunks, n, dim, both)
        queries = sample[np.searchsorted(both, query_rows)]
        say(f"training {plan.factory_string()} on {len(sample):,} sampled vectors")
        trained, sq = train_index(plan, sample, seed)
        del sample
        part_rows = int(partition_rows or _partition_rows(trained))
        exact, parts, part = ExactTopK(queries, TOPK + 1), [], None
        with open(stage / REFINE_FILE, "wb") as refine:
            for start, x in _rows(chunks, n, dim):
                exact.add(start, x)
                if sq is not None:
                    refine.write(sq.sa_encode(x).tobytes())
                pos = 0
                while pos < len(x):  # a chunk may span partitions
                    if part is None:
                        part = faiss.clone_index(trained)
                    take = min(len(x) - pos, part_rows - int(part.ntotal))
                    part.add_with_ids(x[pos: pos + take], np.arange(start + pos, start + pos + take, dtype=np.int64))
                    pos += take
                    if part.ntotal >= part_rows:
                        parts.append(str(stage / f"part{len(parts)}.faiss"))
                        faiss.write_index(part, parts[-1])
                        part = None
                        say(f"partition {len(parts)} written: {start + pos:,} of {n:,} rows added")
                if progress is not None:
                    progress(start + len(x), n)
        if part is not None and part.ntotal:
            parts.append(str(stage / f"part{len(parts)}.faiss"))
            faiss.write_index(part, parts[-1])
        part = None
        if sq is None:
            (stage / REFINE_FILE).unlink()
        say(f"merging {len(parts)} partition(s) into {LISTS_FILE}")
        merge_lists(trained, parts, stage / LISTS_FILE, final=out / LISTS_FILE)
        faiss.write_index(trained, str(stage / IVF_FILE))
        del trained
        for p in parts:
            os.unlink(p)
        if sq is not None:
            faiss.write_index(sq, str(stage / SQ_FILE))
        write_ids(stage, ids, n)
        names = [IVF_FILE, LISTS_FILE, IDS_FILE, OFFSETS_FILE] + ([SQ_FILE, REFINE_FILE] if sq is not None else [])
        meta = {"format_version": ARCHIVE_VERSION, "kind": (extra or {}).get("kind", "images"), "count": n,
                "dim": dim, "plan": plan.to_dict(), "search": {"nprobe": plan.nprobe, "rerank": plan.rerank},
                "files": {name: (stage / name).stat().st_size for name in names}, "extra": extra or {}}
        atomic_write_json(stage / INDEX_FILE, meta)
        staged = ArchiveIndex.load(stage)
        meta["search"] = tune(staged, queries, exact.best_first(), query_rows, target_recall, max_query_ms, say)
        staged.close()
        del staged
        meta["build"] = {"seconds": round(time.perf_counter() - t0, 1), "seed": seed, "partitions": len(parts),
                         "train_size": int(len(both))}
        (out / INDEX_FILE).unlink(missing_ok=True)  # a half-replaced folder is no index
        for name in names:
            os.replace(stage / name, out / name)
        if sq is None:
            for name in (SQ_FILE, REFINE_FILE):
                (out / name).unlink(missing_ok=True)
        atomic_write_json(out / INDEX_FILE, meta)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    say(f"archive index of {n:,} rows written to {out} in {time.perf_counter() - t0:.0f} s")
    return ArchiveIndex.load(out)
