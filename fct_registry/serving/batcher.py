"""Queries that arrive together are searched together: one faiss call per batch (and one ONNX Runtime call for the
images among them), without waiting for a batch to fill.

faiss answers a batch of queries far faster per query than the same queries one by one (the exact index turns a
batch into one matrix product; IVF and HNSW spread a batch over the cores), and a single caller also keeps faiss'
OpenMP threads from competing with each other, as they do when several request threads call faiss at once. So the
service hands every search to one worker thread. When the worker becomes free it takes *everything* queued at that
moment, embeds the uploaded images among it in one ONNX Runtime call per backbone, and searches everything in one
call per (index, k); it never waits for more to arrive, so a lone query is searched as soon as the worker is free
(its latency is not raised), while under load the batches grow by themselves. One caller of ONNX Runtime also keeps
its intra-op threads from competing across request threads.

If a batch fails (one bad query), its queries are embedded or searched again one by one, so each gets its own
answer or error.
A batch smaller than :data:`PARALLEL_FROM` is searched on one thread: a parallel region buys a few queries nothing
and, on a busy machine, makes them wait for its threads to be scheduled (measured: a 20,000-item exact search took
24 ms on 2 OpenMP threads against 0.5 ms on one, with the machine's 2 cores shared with other jobs).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.vectors.search import GalleryIndex, SearchResult, set_search_threads

MAX_BATCH = 256
"""Most queries taken from the queue at once."""
PARALLEL_FROM = 8
"""Smallest batch searched with every core (faiss' OpenMP threads); smaller ones use one thread (see
:func:`~fct_registry.vectors.search.set_search_threads`)."""


@dataclass
class _Job:
    index: GalleryIndex
    query: np.ndarray | None  # (1, d) float32; None until ``image`` is embedded
    k: int
    image: np.ndarray | None = None  # (1, C, H, W) uint8 decoded upload
    embedder: tuple[OnnxModel, InputContract] | None = None
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the worker has done: ``batches`` faiss calls for ``queries`` queries, the largest with ``largest``;
    ``embed_batches`` ONNX Runtime calls for ``images`` uploaded images."""

    batches: int = 0
    queries: int = 0
    largest: int = 0
    embed_batches: int = 0
    images: int = 0


class SearchBatcher:
    """A worker thread that searches queued queries in batches (see the module docstring).

    Args:
        max_batch: Most queries taken at once (the rest wait for the next round).
    """

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="fct-search-batcher", daemon=True)
        self._thread.start()

    def submit(self, index: GalleryIndex, query: np.ndarray, k: int) -> Future:
        """Queue one query; the future resolves to its :class:`SearchResult` (1, k) or to the error of searching it.

        Args:
            index: The index to search (queries of one batch may target different indexes, e.g. across a reload).
            query: (1, d) float32, already checked by the caller (finite, the index's dim).
            k: Neighbours, 1 <= k <= len(index).
        """
        job = _Job(index, query, k)
        self._queue.put(job)
        return job.future

    def submit_image(self, index: GalleryIndex, image: np.ndarray, backbone: OnnxModel, contract: InputContract,
                     k: int) -> Future:
        """Queue one decoded image: embedded by ``backbone`` (with the images queued with it), then searched.

        Args:
            index: The index of the gallery ``backbone`` made.
            image: (1, C, H, W) uint8, as ``contract`` says (decoded by the caller).
            backbone, contract: The served backbone and its input contract.
            k: Neighbours, 1 <= k <= len(index).
        """
        job = _Job(index, None, k, image=image, embedder=(backbone, contract))
        self._queue.put(job)
        return job.future

    async def search(self, index: GalleryIndex, query: np.ndarray, k: int) -> SearchResult:
        """:meth:`submit` and wait without blocking the event loop.

        Raises:
            Whatever :meth:`GalleryIndex.search` raises for this query.
        """
        return await asyncio.wrap_future(self.submit(index, query, k))

    async def search_image(self, index: GalleryIndex, image: np.ndarray, backbone: OnnxModel,
                           contract: InputContract, k: int) -> SearchResult:
        """:meth:`submit_image` and wait without blocking the event loop.

        Raises:
            Whatever :func:`~fct_registry.onnx_boundary.embedding.embed_images` or :meth:`GalleryIndex.search`
            raises for this image.
        """
        return await asyncio.wrap_future(self.submit_image(index, image, backbone, contract, k))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker once the queries queued before are answered."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = [first], False
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            for group in _groups(live, images=True):
                self._embed(group)
            for group in _groups([job for job in live if job.query is not None]):
                self._run(group)
            if stop:
                return

    def _embed(self, group: list[_Job]) -> None:
        """Embed the images of jobs sharing a backbone in one call; a job whose image fails gets the error."""
        self.stats.embed_batches += 1
        self.stats.images += len(group)
        backbone, contract = group[0].embedder
        try:
            vectors = embed_images(backbone, np.concatenate([job.image for job in group]), contract)
        except Exception as exc:  # every caller gets an answer
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            for job in group:
                self._embed([job])
            return
        for row, job in enumerate(group):
            job.query = vectors[row:row + 1]

    def _run(self, group: list[_Job]) -> None:
        self.stats.batches += 1
        self.stats.queries += len(group)
        self.stats.largest = max(self.stats.largest, len(group))
        set_search_threads(None if len(group) >= PARALLEL_FROM else 1)
        try:
            result = group[0].index.search(np.concatenate([job.query for job in group]), group[0].k)
        except Exception as exc:  # every caller gets an answer
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            for job in group:  # one bad query must not fail the others: each on its own
                self._run([job])
            return
        for row, job in enumerate(group):
            job.future.set_result(SearchResult(scores=result.scores[row:row + 1], ids=result.ids[row:row + 1]))


def _groups(jobs: list[_Job], images: bool = False) -> Iterator[list[_Job]]:
    """The jobs grouped by (index, k) in order of first arrival: one faiss call each; with ``images``, the jobs
    holding an image grouped by (backbone, contract): one ONNX Runtime call each."""
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        if images and job.embedder is not None:
            groups.setdefault((id(job.embedder[0]), id(job.embedder[1])), []).append(job)
        elif not images:
            groups.setdefault((id(job.index), job.k), []).append(job)
    yield from groups.values()
