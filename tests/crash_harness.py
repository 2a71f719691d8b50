"""Run an index write in a child process that may be killed, then check that the index folder is whole.

Children are forked from the test process (the model code is already imported, so a child starts in well under a
second) and die by a real SIGKILL from ``retrieval.faults``. "Whole" is the promise of issue 7: the catalog opens,
``check`` finds no problem, the vectors a search uses hold exactly the catalog's ok rows (each once), every stored
embedding is the one a clean run stores, and a search answers.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sqlalchemy import select

from indexer.check import check_index
from retrieval.errors import EmptyIndexError
from retrieval.faults import AFTER_COMMITS_ENV, FAULT_ENV, reset_faults
from retrieval.search.engine import SearchEngine
from retrieval.store.catalog import STATUS_OK, Catalog, ImageRow
from retrieval.store.layout import IndexLayout
from retrieval.store.sync import open_vectors

KILLED = -9
EMBEDDING_TOLERANCE = 2e-3  # float16 storage and batch-dependent float sums


def run_in_child(work: Callable[[], object], fault: str | None = None, after_commits: int | None = None) -> int:
    """Fork, run ``work`` with the given fault armed, and return the child's exit code (-9 when it was killed)."""
    return wait_for_child(start_child(work, fault, after_commits))


def start_child(work: Callable[[], object], fault: str | None = None, after_commits: int | None = None) -> int:
    """Fork a child that runs ``work`` (exit 0, or 1 with a traceback on stderr); return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            import torch

            torch.set_num_threads(1)  # the parent's thread pool does not survive fork
            reset_faults()
            os.environ.pop(FAULT_ENV, None)
            os.environ.pop(AFTER_COMMITS_ENV, None)
            if fault:
                os.environ[FAULT_ENV] = fault
            if after_commits:
                os.environ[AFTER_COMMITS_ENV] = str(after_commits)
            work()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def wait_for_child(pid: int, block: bool = True) -> int | None:
    """The child's exit code (-9 when killed); None when ``block`` is false and it is still running."""
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def stored_embeddings(index_dir: Path) -> dict[str, np.ndarray]:
    """Path -> stored (float16 -> float32) embedding of every ok row."""
    catalog = Catalog(IndexLayout(index_dir).catalog)
    try:
        with catalog.session() as session:
            rows = session.scalars(select(ImageRow).where(ImageRow.status == STATUS_OK))
            return {row.path: row.vector() for row in rows}
    finally:
        catalog.close()


def assert_index_whole(
    index_dir: Path,
    reference: dict[str, np.ndarray] | None = None,
    complete: bool = False,
) -> dict[str, np.ndarray]:
    """Assert every invariant; ``reference`` holds a clean run's embeddings, ``complete`` asks for all of them."""
    try:
        report = check_index(index_dir)
    except EmptyIndexError:  # killed before the catalog was ever created: nothing committed, nothing to lose
        assert not complete
        return {}
    assert report.healthy, f"check found problems: {report.remaining}"
    layout = IndexLayout(index_dir)
    catalog = Catalog(layout.catalog)
    try:
        with catalog.session() as session:
            rows = list(session.execute(select(ImageRow.id, ImageRow.path, ImageRow.status)))
        paths = [path for _, path, _ in rows]
        assert len(paths) == len(set(paths)), "a path is in the catalog twice"
        ok_ids = sorted(image_id for image_id, _, status in rows if status == STATUS_OK)
        identity = catalog.model_identity()
        if identity is not None:
            vectors = open_vectors(catalog, layout, identity.embed_dim, persist=False)
            faiss_ids = sorted(int(i) for i in vectors.ids())
            assert faiss_ids == ok_ids, "FAISS ids and catalog ok rows disagree"
    finally:
        catalog.close()
    embeddings = stored_embeddings(index_dir)
    if reference is not None:
        unexpected = set(embeddings) - set(reference)
        assert not unexpected, f"indexed files that a clean run does not have: {sorted(unexpected)[:3]}"
        if complete:
            missing = set(reference) - set(embeddings)
            assert not missing, f"lost {len(missing)} image(s), e.g. {sorted(missing)[0]}"
        for path, vector in embeddings.items():
            assert np.abs(vector - reference[path]).max() < EMBEDDING_TOLERANCE, f"wrong embedding for {path}"
    if ok_ids:
        _assert_search_answers(index_dir, embeddings)
    return embeddings


def _assert_search_answers(index_dir: Path, embeddings: dict[str, np.ndarray]) -> None:
    """A search for an indexed image's own vector scores 1 at the top, and every result's score is the cosine
    with that result's own stored embedding (so FAISS ids point at the right rows)."""
    unit = {path: vector / np.linalg.norm(vector) for path, vector in embeddings.items()}
    query = sorted(unit.items())[0][1][None, :].astype(np.float32)
    with SearchEngine(index_dir, device="cpu") as engine:
        results = engine.search_vectors(query, k=min(5, len(unit)))[0]
    assert results, "a search over a non-empty index returned nothing"
    assert len({r.image_id for r in results}) == len(results), "a search returned an image twice"
    assert results[0].score > 0.999
    for result in results:
        assert abs(result.score - float(unit[result.path] @ query[0])) < 1e-3, f"score of {result.path} is wrong"
