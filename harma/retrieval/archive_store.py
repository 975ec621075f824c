"""The row-ordered files of an archive index: ids and SQ8 re-ranking codes, read per row.

Ten million ids as a Python list cost about 1 GB; here they are one UTF-8 blob (``ids.bin``) and
``n + 1`` uint64 byte offsets (``ids.offsets``), both memory-mapped, and one id is decoded when asked
for. The SQ8 codes (``refine.sq8``, ``dim`` bytes per row, row order) are read with ``os.pread`` for
the candidates of one query only: unlike a memory map, reads leave no pages mapped into the
process, so a served index does not grow towards the 5 GB of codes of 10^7 x 512 vectors.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import IndexFormatError, InputError

IDS_FILE = "ids.bin"
OFFSETS_FILE = "ids.offsets"
REFINE_FILE = "refine.sq8"
ID_BATCH = 65_536  # ids encoded and written per write call


def write_ids(folder: Path, ids: Iterable[object], n: int) -> int:
    """Write ``ids`` (``n`` of them, as strings) into ``folder/ids.bin`` + ``folder/ids.offsets``,
    streaming (bounded memory); returns the blob's size. A different count raises :class:`InputError`."""
    count, end = 0, 0
    with open(folder / IDS_FILE, "wb") as blob, open(folder / OFFSETS_FILE, "wb") as offsets:
        offsets.write(np.zeros(1, np.uint64).tobytes())
        batch: list[bytes] = []

        def flush() -> None:
            nonlocal end
            if not batch:
                return
            ends = end + np.cumsum([len(b) for b in batch], dtype=np.uint64)
            blob.write(b"".join(batch))
            offsets.write(ends.astype(np.uint64).tobytes())
            end = int(ends[-1])
            batch.clear()

        for i in ids:
            count += 1
            if count > n:
                raise InputError(f"ids: more than the {n:,} rows of the index")
            batch.append(str(i).encode("utf-8", "surrogatepass"))
            if len(batch) >= ID_BATCH:
                flush()
        flush()
    if count != n:
        raise InputError(f"ids: {count:,} given for {n:,} rows")
    return end


def _map(path: Path, dtype: type, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class IdStore:
    """The ids of an archive index, memory-mapped; :meth:`get` decodes one."""

    def __init__(self, folder: Path, n: int) -> None:
        offsets_path, blob_path = folder / OFFSETS_FILE, folder / IDS_FILE
        for p in (offsets_path, blob_path):
            if not p.is_file():
                raise IndexFormatError(f"{p}: missing (an archive index needs {IDS_FILE} and {OFFSETS_FILE})")
        size = offsets_path.stat().st_size
        if size != 8 * (n + 1):
            raise IndexFormatError(f"{offsets_path}: {size} bytes, expected {8 * (n + 1)} for {n:,} rows "
                                   "(truncated or from another index)")
        self.offsets = _map(offsets_path, np.uint64, n + 1)
        blob_size = blob_path.stat().st_size
        if int(self.offsets[-1]) != blob_size or int(self.offsets[0]) != 0:
            raise IndexFormatError(f"{blob_path}: {blob_size} bytes, but {OFFSETS_FILE} ends at "
                                   f"{int(self.offsets[-1])} (truncated or from another index)")
        self.blob = _map(blob_path, np.uint8, blob_size)
        self.n = n

    def get(self, row: int) -> str:
        row = int(row)
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} out of range for an index of {self.n:,} rows")
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        if b < a:
            raise IndexFormatError(f"{IDS_FILE}: offsets of row {row} decrease (corrupt {OFFSETS_FILE})")
        return bytes(self.blob[a:b]).decode("utf-8", "surrogatepass")


class SQ8Decoder:
    """Decodes SQ8 codes in numpy with the trained ranges of a faiss ``IndexScalarQuantizer``
    (QT_8bit: ``vmin + (code + 0.5) / 255 * vdiff`` per dimension).

    Why not ``sa_decode``: one query's few hundred codes are decoded right after the PQ search, and
    on a busy 2-core machine waking faiss's OpenMP threads again cost 6 ms of a 8 ms query (measured
    at 10^6 x 512); numpy does it in one thread in microseconds. The formula is checked against
    ``sa_decode`` when the index opens and ``sa_decode`` is used instead if they differ.
    """

    def __init__(self, sq_index: object) -> None:
        import faiss

        self.index, d = sq_index, int(sq_index.d)
        trained = faiss.vector_to_array(sq_index.sq.trained).astype(np.float32)
        self.vmin, self.step = (trained[:d], trained[d:] / 255.0) if trained.size == 2 * d else (None, None)
        probe = np.random.default_rng(0).integers(0, 256, (16, int(sq_index.sa_code_size())), dtype=np.uint8)
        if self.vmin is None or not np.allclose(self._numpy(probe), sq_index.sa_decode(probe), atol=1e-6):
            self.vmin = self.step = None

    def _numpy(self, codes: np.ndarray) -> np.ndarray:
        return self.vmin + (codes.astype(np.float32) + 0.5) * self.step

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        """(m, d) float32 vectors of (m, d) uint8 codes."""
        return self.index.sa_decode(codes) if self.vmin is None else self._numpy(codes)


READ_THREADS = 8  # re-ranking codes read at once per query ...
PARALLEL_FROM = 256  # ... from this many candidates


@functools.lru_cache(maxsize=None)
def _readers() -> ThreadPoolExecutor:
    """The process's pool of reader threads (made on first use)."""
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="harma-sq8")


class RefineCodes:
    """Per-row SQ8 codes on disk, read with ``os.pread`` for the rows asked only."""

    def __init__(self, path: Path, n: int, code_size: int) -> None:
        if not path.is_file():
            raise IndexFormatError(f"{path}: missing (the re-ranking codes of an ivf_pq archive index)")
        size = path.stat().st_size
        if size != n * code_size:
            raise IndexFormatError(f"{path}: {size} bytes, expected {n * code_size} ({n:,} rows x {code_size}) "
                                   "(truncated or from another index)")
        self.path, self.n, self.code_size = path, n, code_size
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, rows: Sequence[int]) -> np.ndarray:
        """(len(rows), code_size) uint8 codes of ``rows`` (in the order given).

        From :data:`PARALLEL_FROM` rows the reads are spread over :data:`READ_THREADS` threads (``os.pread``
        releases the GIL): rows not in the page cache are random reads from disk, and several in flight
        at once cut a query's wait (10^7 x 512, rerank 1,024, first pass over the queries: p50 36 ms
        with one reader)."""
        cs, fd = self.code_size, self.fd
        rows = [int(r) for r in rows]

        def part(some: list[int]) -> bytes:
            return b"".join([os.pread(fd, cs, r * cs) for r in some])

        if len(rows) < PARALLEL_FROM:
            blob = part(rows)
        else:
            step = -(-len(rows) // READ_THREADS)
            blob = b"".join(_readers().map(part, [rows[i: i + step] for i in range(0, len(rows), step)]))
        if len(blob) != len(rows) * cs:
            raise IndexFormatError(f"{self.path}: shorter than its {self.n:,} rows (truncated since it was opened?)")
        return np.frombuffer(blob, np.uint8).reshape(len(rows), cs)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
