"""Which index a collection gets, from its size and a memory budget (the index plan).

A small, pure version of autofaiss's rule (autofaiss itself pins numpy<2): exact search below
:data:`EXACT_BELOW` vectors (a format-1 :class:`~harma.retrieval.EmbeddingIndex`, as before); an
IVF-Flat index (Jégou et al. 2011) while all its vectors fit the budget; above that IVF-PQ, product
quantisation (optionally rotated by OPQ) with the largest code that fits, followed by a re-ranking
stage over 8-bit scalar-quantised copies of the vectors (SQ8) read from disk for the candidates only.
The budget bounds what the index would cost held fully in memory (autofaiss's
``max_index_memory_usage``); the archive index itself keeps its lists on disk, memory-mapped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .ann import default_nlist

EXACT_BELOW = 100_000  # below this many vectors: exact search (format 1, EmbeddingIndex), as today
KINDS = ("exact", "ivf_flat", "ivf_pq")
# PQ code bytes per vector, largest first. No PQ128: the SQ8 re-ranking restores the order, the code
# only has to find candidates, and a served index keeps the lists' pages that queries touch resident:
# on a skewed 10^7 x 512 collection 100 queries touched nearly all of PQ128's 1.36 GB of lists (serving
# RSS 2.2 GB) against PQ64's 0.72 GB (python -m benchmarks.archive).
PQ_CHOICES = (64, 32, 16)
HNSW_QUANTIZER_FROM = 4096  # nlist from which the coarse quantizer is an HNSW graph, not a flat scan
HNSW_M = 32  # neighbours per node of that graph
TRAIN_PER_LIST = 64  # k-means training points per IVF list at most ...
TRAIN_MAX = 300_000  # ... and in all (k-means on 2 cores: cost grows with sample x nlist x dim)
TRAIN_MIN = 10_000  # the PQ / SQ codebooks want a fair sample even when there are few lists
ID_BYTES = 8  # an IVF list stores an int64 row id beside each code
GB = 1e9


@dataclass(frozen=True)
class IndexPlan:
    """What index to build and how to search it; written into a format-2 ``index.json``.

    Attributes:
        kind: ``exact`` | ``ivf_flat`` | ``ivf_pq``.
        nlist: IVF lists (``ivf_*``).
        pq_m: PQ code bytes per vector (``ivf_pq``, 8-bit codes), e.g. 64.
        opq: an OPQ rotation before PQ (``ivf_pq``).
        refine: ``"sq8"`` (``ivf_pq``): re-rank candidates with 8-bit scalar-quantised vectors.
        nprobe: lists scanned per query (stored with the index, tunable).
        rerank: candidates re-ranked per query (``ivf_pq`` + refine; stored, tunable).
        train_size: vectors sampled (seeded) to train the quantisers.
        memory_bytes: estimated RAM of the index if held fully in memory (what the budget bounds).
        disk_bytes: estimated size on disk (ids excluded: their length is not known in advance).
        reason: one line: why this kind (shown to the user).
    """

    kind: str
    nlist: int = 0
    pq_m: int = 0
    opq: bool = False
    refine: str = ""
    nprobe: int = 0
    rerank: int = 0
    train_size: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"index plan kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind != "exact" and self.nlist < 1:
            raise ConfigError(f"index plan {self.kind}: nlist must be >= 1, got {self.nlist!r}")
        if self.kind == "ivf_pq" and self.pq_m < 1:
            raise ConfigError(f"index plan ivf_pq: pq_m must be >= 1, got {self.pq_m!r}")
        if self.refine not in ("", "sq8"):
            raise ConfigError(f"index plan refine {self.refine!r} is not '' or 'sq8'")

    @property
    def hnsw_quantizer(self) -> bool:
        """Whether the coarse quantizer is an HNSW graph (many lists: a flat scan of the centroids
        would dominate both adding and searching)."""
        return self.nlist >= HNSW_QUANTIZER_FROM

    def factory_string(self) -> str:
        """A faiss-style description, e.g. ``IVF16384_HNSW32,PQ128 + SQ8 re-rank``."""
        if self.kind == "exact":
            return "Flat (exact)"
        coarse = f"IVF{self.nlist}" + (f"_HNSW{HNSW_M}" if self.hnsw_quantizer else "")
        if self.kind == "ivf_flat":
            return f"{coarse},Flat"
        text = (f"OPQ{self.pq_m}," if self.opq else "") + f"{coarse},PQ{self.pq_m}"
        return text + (" + SQ8 re-rank" if self.refine == "sq8" else "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexPlan":
        """The plan recorded in ``index.json`` (unknown keys refused with :class:`ConfigError`)."""
        if not isinstance(d, dict):
            raise ConfigError(f"index plan must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"index plan: unknown field(s) {', '.join(unknown)}")
        return cls(**d)


def train_size(n: int, nlist: int) -> int:
    """Vectors sampled to train the quantisers: :data:`TRAIN_PER_LIST` per list, at least
    :data:`TRAIN_MIN`, at most :data:`TRAIN_MAX` and ``n``."""
    return int(min(n, TRAIN_MAX, max(TRAIN_MIN, TRAIN_PER_LIST * nlist)))


def _pq_m(dim: int) -> list[int]:
    """Code sizes PQ can use for ``dim`` (they must divide it), largest first."""
    choices = [m for m in PQ_CHOICES if dim % m == 0 and m <= dim]
    return choices or [max(m for m in range(1, min(dim, 64) + 1) if dim % m == 0)]


def plan_index(n: int, dim: int, memory_gb: float = 8.0, *, opq: bool = False) -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` floats under a ``memory_gb`` budget (10^9 bytes).

    Exact below :data:`EXACT_BELOW`; IVF-Flat while ``n * (4 dim + 8)`` plus its centroids fit;
    else IVF-PQ with the largest code in :data:`PQ_CHOICES` dividing ``dim`` whose codes and ids fit
    (the smallest if none does; the reason says so) and an SQ8 re-ranking stage. ``nlist`` is
    :func:`~harma.retrieval.ann.default_nlist` (about 4 sqrt(n), a power of two); ``nprobe`` and
    ``rerank`` are starting points that :func:`harma.retrieval.build_archive` raises until the
    measured recall@10 reaches its target.
    """
    if n < 0 or dim < 1:
        raise ConfigError(f"cannot plan an index of {n} vectors of dimension {dim}")
    if not memory_gb > 0:
        raise ConfigError(f"memory budget must be > 0 GB, got {memory_gb!r}")
    budget = int(memory_gb * GB)
    flat_bytes = n * (4 * dim + ID_BYTES)
    if n < EXACT_BELOW:
        return IndexPlan("exact", memory_bytes=n * 4 * dim, disk_bytes=n * 4 * dim,
                         reason=f"{n:,} vectors < {EXACT_BELOW:,}: exact search reads them all in a few ms")
    nlist = default_nlist(n)
    centroids = nlist * 4 * dim
    nprobe = max(16, nlist // 256)
    if flat_bytes + centroids <= budget:
        return IndexPlan("ivf_flat", nlist=nlist, nprobe=nprobe, train_size=train_size(n, nlist),
                         memory_bytes=flat_bytes + centroids, disk_bytes=flat_bytes + centroids,
                         reason=f"IVF-Flat: its {(flat_bytes + centroids) / GB:.2f} GB of vectors fit the "
                                f"{memory_gb:g} GB budget")
    choices = _pq_m(dim)
    fits = [m for m in choices if n * (m + ID_BYTES) + centroids <= budget]
    m = fits[0] if fits else choices[-1]
    memory = n * (m + ID_BYTES) + centroids
    why = (f"IVF-PQ{m} + SQ8 re-rank: IVF-Flat would need {(flat_bytes + centroids) / GB:.1f} GB > "
           f"{memory_gb:g} GB budget; PQ{m} codes and ids need {memory / GB:.2f} GB")
    if not fits:
        why += " (over the budget even so: the lists stay on disk, memory-mapped)"
    return IndexPlan("ivf_pq", nlist=nlist, pq_m=m, opq=opq, refine="sq8", nprobe=nprobe, rerank=256,
                     train_size=train_size(n, nlist), memory_bytes=memory,
                     disk_bytes=memory + n * dim + (dim * dim * 4 if opq else 0), reason=why)
