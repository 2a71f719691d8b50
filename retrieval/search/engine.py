"""SearchEngine: open an index folder and answer text, image and vector queries with catalog rows."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import EmptyIndexError, UsageError
from retrieval.model.device import Device, resolve_device
from retrieval.model.encoder import Encoder
from retrieval.model.image_onnx import (
    ONNX,
    ImageEncoder,
    cached_image_tower,
    choose_image_backend,
    shared_image_encoder,
)
from retrieval.model.spec import ModelIdentity, ModelSpec, spec_key
from retrieval.model.text_encoder import BackendChoice, TextEncoder, open_text_encoder
from retrieval.model.text_onnx import exported_tower
from retrieval.search.arguments import check_image_file
from retrieval.search.fusion import KEYWORD_WEIGHT, TEXT_WEIGHT, newest_first, reciprocal_rank_fusion
from retrieval.search.query import Filters, Query, Term
from retrieval.store.catalog_reads import STATUS_OK, CatalogReader, MetaKey, StoredImage, open_reader
from retrieval.store.filters import allowed_ids, keyword_ranking, passing, scans_every_row, text_ranking
from retrieval.store.image_text import OCR_SOURCE, ImageText, read_text
from retrieval.store.layout import IndexLayout
from retrieval.store.paths import catalog_path, display_path
from retrieval.store.sync import fetch_vectors, open_vectors
from retrieval.store.topk import empty_top_k, merge_top_k
from retrieval.store.vectors import VectorIndex
from retrieval.unit import unit_rows

FUSION_DEPTH = 1000  # how deep the CLIP and keyword rankings go before they are fused (fixed, so pages agree)
EXACT_BLOCK = 65536  # ids per block when a filtered search falls back to exact scoring over the catalog
OVER_FETCH = (4, 32)  # a wide filter first searches this many times deeper unfiltered and checks the candidates
OVER_FETCH_MAX = 4096  # deepest over-fetch; past it (or when short) the filter's id list is searched instead

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.store.catalog import Catalog


@dataclass(frozen=True)
class SearchResult:
    rank: int
    score: float
    path: str
    image_id: int
    width: int | None
    height: int | None
    taken_at: str | None = None  # date taken (EXIF, else the file's mtime), wall clock "YYYY-MM-DD HH:MM:SS"
    stage: str = "clip"  # which scorer produced ``score``: "clip" (cosine) or "itm" (re-ranker's match probability)
    clip_score: float | None = None  # the cosine, when the re-ranker produced ``score``
    matched: str = "clip"  # why it is here: "clip" (the picture), "name" (file-name keywords) or "text" (words read
    # in the photo); the score is CLIP's cosine whatever the reason

    def to_dict(self) -> dict:
        """JSON-ready: a file name that is not valid UTF-8 shows its odd bytes as ``\\xNN`` (``.path`` keeps
        them exactly, for opening the file). ``stage`` and ``clip_score`` appear on re-ranked results only."""
        out = asdict(self) | {"path": display_path(self.path)}
        if self.stage == "clip":
            del out["stage"], out["clip_score"]
        return out


class SearchEngine:
    """Read side of an index. The model loads on the first query that needs it; the index on the first search."""

    def __init__(
        self,
        index_dir: Path | str,
        device: Device | str = "auto",
        model: ModelSpec | None = None,
        text_bf16: bool = False,
        rerank_model: Path | str | None = None,
        force_rerank: bool = False,
    ):
        self.device = resolve_device(device)  # the public entry: a string from a library caller resolves here
        self.layout = IndexLayout(Path(index_dir).expanduser())
        self.reads: CatalogReader = open_reader(self.layout.catalog)  # plain sqlite3: what a query reads
        self._catalog: Catalog | None = None  # the ORM (filters, per-image text, the server), opened on first use
        self.text_bf16 = text_bf16  # CPU: encode text queries with a bfloat16 text tower (see Encoder.load_text_only)
        self.identity: ModelIdentity | None = self.reads.model_identity()
        if model is not None:
            self.reads.check_model(spec_key(model), model.describe())
        self._encoder: Encoder | None = None
        self._image: ImageEncoder | None = None  # image queries: ONNX or the torch model (image_encoder)
        self._vectors: VectorIndex | None = None
        self._text: tuple[tuple, TextEncoder, BackendChoice] | None = None  # (what it was chosen from, encoder, choice)
        self.rerank_model = rerank_model  # ITM re-ranker folder; None: FOLDER-itm beside a local-dir:FOLDER model
        self.force_rerank = force_rerank  # use a re-ranker even when it validated worse than the dual encoder
        self._reranker = None

    def close(self) -> None:
        """Close the catalog and let go of the mapped FAISS file and the text tower (an unmount can follow)."""
        self.reads.close()
        if self._catalog is not None:
            self._catalog.close()
        self._vectors, self._text = None, None

    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def catalog(self) -> Catalog:
        """The catalog with its ORM (SQLAlchemy): for filters, per-image text and the server. A plain text query
        reads through ``reads`` alone and never imports it."""
        if self._catalog is None:
            from retrieval.store.catalog import Catalog

            self._catalog = Catalog(self.layout.catalog, create=False)
        return self._catalog

    @property
    def model_spec(self) -> ModelSpec:
        if self.identity is None:
            raise EmptyIndexError(f"the index at {self.layout.root} is empty: run `clipsearch index FOLDER` first")
        return ModelSpec(self.identity.name, self.identity.pretrained)

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            spec = self.model_spec
            self.reads.check_model(spec_key(spec), spec.describe())
            self._encoder = Encoder.load(spec, self.device)
        return self._encoder

    @property
    def image_encoder(self) -> ImageEncoder:
        """For images outside the index (``similar`` with a new file, uploads): the model's cached ONNX image tower
        on the CPU when current (no torch: ``choose_image_backend``), else the torch model."""
        if self._image is None:
            self.model_spec  # noqa: B018  (an empty index says so)
            tower = cached_image_tower(self.identity.key())
            if choose_image_backend(self.device, tower).backend == ONNX:
                try:
                    self._image = shared_image_encoder(tower)
                except Exception:  # noqa: BLE001  (the torch model still answers)
                    self._image = None
            if self._image is None:
                self._image = self.encoder
        return self._image

    @property
    def text_encoder(self) -> TextEncoder:
        """For text queries: the backend ``retrieval.model.text_encoder`` chooses; chosen again only when the
        catalog's export record changes or this engine loads the whole model."""
        return self._text_backend()[0]

    @property
    def text_choice(self) -> BackendChoice:
        """Which backend answers text queries, and why."""
        return self._text_backend()[1]

    def _text_backend(self) -> tuple[TextEncoder, BackendChoice]:
        spec = self.model_spec
        record = self.reads.get_meta(MetaKey.TEXT_TOWER)
        facts = (record, self._encoder is not None)
        if self._text is None or self._text[0] != facts:
            tower = exported_tower(self.layout.root, record, self.identity.key())
            check = lambda: self.reads.check_model(spec_key(spec), spec.describe())  # noqa: E731
            encoder, choice = open_text_encoder(spec, self.device, tower, self.text_bf16, facts[1], check)
            self._text = (facts, encoder, choice)
        return self._text[1], self._text[2]

    @property
    def vectors(self) -> VectorIndex:
        if self._vectors is None:
            self.model_spec  # noqa: B018  (raises on an index that has no images yet)
            vectors = open_vectors(self.reads, self.layout, self.identity.embed_dim, persist=False, read_only=True)
            vectors.use_device(self.device)  # GPU search with CUDA (retrieval.store.gpu), else the CPU
            if not len(vectors):
                raise EmptyIndexError(f"no images are indexed in {self.layout.root} yet")
            self._vectors = vectors
        return self._vectors

    def refresh(self) -> None:
        """Pick up what an indexer committed since this engine opened."""
        self.identity = self.reads.model_identity()
        self._vectors = None

    # --- queries --------------------------------------------------------------------------------------------

    def search(
        self, query: Query, k: int = 10, min_score: float | None = None, rerank: int | None = None
    ) -> list[SearchResult]:
        """The k best images for a combined query, within its filters, in its sort order. Indexed images used as
        terms are left out of the results. ``min_score`` drops results below that cosine score, except file-name
        and text matches (their place comes from the name or the words read in the photo, not the picture).

        ``rerank=N`` (a query of one text): the N best, re-ordered by the ITM re-ranker and cut to k
        (``retrieval.search.rerank``); ``min_score`` then applies to the first stage's cosine."""
        if rerank:
            from retrieval.search.rerank import check_depth, rerank_results, rerank_text

            check_depth(rerank, k)
            text = rerank_text(query)
            candidates = self.search(query, rerank, min_score)
            return rerank_results(text, candidates, self.reranker, self.encoder.identity.image_size)[:k]
        _check_k(k)
        self.vectors  # noqa: B018  (fail on an empty index before loading the model)
        filters = self._resolved(query.filters)
        vector, exclude = self._query_vector(query)
        deep = max(k + len(exclude), FUSION_DEPTH)
        keyword_text, words = query.keyword_text, query.text_words
        named = keyword_ranking(self.catalog, keyword_text, filters, deep) if keyword_text is not None else []
        read = text_ranking(self.catalog, words, filters, deep) if words is not None and self.reads.holds_text() else []
        named, read = [i for i in named if i not in exclude], [i for i in read if i not in exclude]
        fused = keyword_text is not None or bool(read)  # an index without text costs nothing more
        scores, ids = self._filtered_search(vector, deep if fused else k + len(exclude), filters)
        score_of = {
            int(i): float(s) for s, i in zip(scores, ids) if i >= 0 and np.isfinite(s) and int(i) not in exclude
        }
        order = list(score_of)
        matched = {i: "text" for i in read} | {i: "name" for i in named}  # why each is here, beyond the picture
        if fused:
            order = reciprocal_rank_fusion([named, read, order], [KEYWORD_WEIGHT, TEXT_WEIGHT, 1.0])
            unscored = np.array([i for i in matched if i not in score_of], dtype=np.int64)
            if len(unscored):
                score_of.update(zip(unscored.tolist(), (fetch_vectors(self.reads, unscored) @ vector[0]).tolist()))
        if min_score is not None:
            order = [i for i in order if i in matched or score_of[i] >= min_score]
        rows = self.reads.rows_by_id(order[:k])
        order = [i for i in order[:k] if i in rows]
        if query.sort == "date":
            order = newest_first(order, {i: rows[i].taken_at for i in order})
        return [_result(rank, rows[i], score_of[i], matched.get(i, "clip")) for rank, i in enumerate(order, start=1)]

    def _resolved(self, filters: Filters) -> Filters:
        if filters.under is None:
            return filters
        folder = Path(filters.under).expanduser()
        if not folder.is_dir():
            raise UsageError(f"no such folder: {folder}")
        return filters.with_under(str(folder.resolve()))

    def _query_vector(self, query: Query) -> tuple[np.ndarray, set[int]]:
        """sum(w q) over positive terms minus sum(w q) over negative ones, each q a unit vector, re-normalised;
        and the ids of the indexed images among the terms."""
        terms = [(term, 1.0) for term in query.positive] + [(term, -1.0) for term in query.negative]
        texts = [term for term, _ in terms if not term.is_image]
        encoded = dict(zip(map(id, texts), self.text_encoder.encode_texts([t.text for t in texts]))) if texts else {}
        total, exclude = None, set()
        for term, sign in terms:
            if term.is_image:
                vector, image_id = self._image_vector(term)
                if image_id is not None:
                    exclude.add(image_id)
            else:
                vector = encoded[id(term)]
            part = sign * term.weight * unit_rows(np.asarray(vector, dtype=np.float32).reshape(1, -1))
            total = part if total is None else total + part
        if float(np.linalg.norm(total)) < 1e-6:
            raise UsageError("the terms of this query cancel each other out: change a weight or a term")
        return unit_rows(total), exclude

    def _image_vector(self, term: Term) -> tuple[np.ndarray, int | None]:
        """An image term's vector, and its id when it is an indexed image (its stored vector is used)."""
        if term.picture is not None:
            return self.image_encoder.encode_pil([term.picture]), None
        if term.image_id is not None:
            row = self.row(term.image_id)
            if row is None or row.status != STATUS_OK:
                raise UsageError(f"no indexed image has id {term.image_id}")
            return row.vector(), row.id
        path = check_image_file(term.path)  # a folder, a device or not an image: said before any decoding
        row = self.reads.row_by_path(catalog_path(path)) or self.reads.row_by_path(os.path.realpath(path))
        if row is not None and row.status == STATUS_OK:  # a link to an indexed file is that file (indexed once)
            return row.vector(), row.id
        return self._encode_file(path), None

    def _filtered_search(self, vector: np.ndarray, depth: int, filters: Filters):
        """Top ``depth`` (scores, ids) among the images the filters let through. A filter that would scan every
        row's facts (camera, type, size) first over-fetches: search deeper unfiltered, keep the candidates that
        pass, and stop once ``depth`` of them do or every vector was searched; a bounded number of rounds, then
        the filter's id list is searched as a narrow filter's is, so k results come back whenever k images match."""
        if not filters.active:
            return self._vector_search(vector, depth, None)
        if scans_every_row(filters):
            for factor in OVER_FETCH:
                fetch = min(depth * factor, len(self.vectors))
                if fetch > OVER_FETCH_MAX:
                    break
                scores, ids = self._vector_search(vector, fetch, None)
                keep = passing(self.catalog, [int(i) for i in ids if i >= 0], filters)
                chosen = np.array([i in keep for i in ids.tolist()], dtype=bool)
                if chosen.sum() >= depth or fetch >= len(self.vectors):
                    return scores[chosen][:depth], ids[chosen][:depth]
        allowed = allowed_ids(self.catalog, filters)
        if not len(allowed):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return self._vector_search(vector, depth, allowed)

    def _vector_search(self, vector: np.ndarray, depth: int, allowed: np.ndarray | None):
        """Top ``depth`` (scores, ids) within ``allowed``. An approximate index may visit too few allowed vectors
        under a wide filter; then the allowed ids are scored exactly from the catalog, block by block, so k
        results come back whenever k images match."""
        scores, ids = self.vectors.search(vector, depth, allowed)
        if allowed is None or int((ids[0] >= 0).sum()) >= min(depth, len(allowed)):
            return scores[0], ids[0]
        best = empty_top_k(1)
        for start in range(0, len(allowed), EXACT_BLOCK):
            block = allowed[start : start + EXACT_BLOCK]
            best = merge_top_k(best, (fetch_vectors(self.reads, block) @ vector[0])[None, :], block, depth)
        return best[0][0], best[1][0]

    def search_text(
        self,
        text: str,
        k: int = 10,
        min_score: float | None = None,
        under: Path | str | None = None,
        rerank: int | None = None,
    ):
        return self.search(Query((Term(text=text),), filters=Filters(under=under)), k, min_score, rerank)

    @property
    def reranker(self):
        """The ITM re-ranker (``retrieval.model.itm_scorer.ItmScorer``) on this index's model, loaded on first use."""
        if self._reranker is None:
            from retrieval.model.itm_scorer import ItmScorer
            from retrieval.search.rerank import default_rerank_folder

            folder = self.rerank_model or default_rerank_folder(self.model_spec.name)
            if folder is None or not Path(folder).expanduser().is_dir():  # a condition no retry clears: 400, not 503
                where = f" (no folder {folder})" if self.rerank_model else ""
                raise UsageError(
                    f"no re-ranker for this model{where}: pass --rerank-model FOLDER (see clipsearch train-itm)"
                )
            self._reranker = ItmScorer.load(folder, self.encoder, self.encoder.identity.key(), self.force_rerank)
        return self._reranker

    def search_image(
        self, image: Path | str | Image.Image, k: int = 10, min_score: float | None = None, under=None
    ) -> list[SearchResult]:
        """Images like ``image``; an indexed query image is left out of its own results."""
        term = Term(path=str(image)) if isinstance(image, (str, Path)) else Term(picture=image)
        return self.search(Query((term,), filters=Filters(under=under)), k, min_score)

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[SearchResult]]:
        """Raw FAISS search for many query vectors at once (used by evaluation)."""
        _check_k(k)
        scores, ids = self.vectors.search(queries, k)
        rows = self.reads.rows_by_id(sorted({int(i) for i in ids.ravel() if i >= 0}))
        return [_results(score_row, id_row, rows, None, ()) for score_row, id_row in zip(scores, ids)]

    def vectors_for_paths(self, paths: list[str | Path]) -> np.ndarray:
        """Stored normalised embeddings in the order given; every path must be indexed successfully."""
        keys = [catalog_path(p) for p in paths]
        rows = self.reads.rows_by_paths(keys)
        missing = [key for key in keys if key not in rows or rows[key].status != STATUS_OK]
        if missing:
            raise UsageError(f"{len(missing)} image(s) are not indexed, e.g. {missing[0]}")
        return unit_rows(np.stack([rows[key].vector() for key in keys]))

    def row(self, image_id: int) -> StoredImage | None:
        """The catalog row of an indexed image (ok or failed), or None: how the web app maps ids to files."""
        return self.reads.rows_by_id([int(image_id)]).get(int(image_id))

    def text_of(self, image_id: int, source: str = OCR_SOURCE) -> ImageText:
        """What a text source (the OCR pass, the caption pass) found for an image (``retrieval.store.image_text``):
        its lines, or why there are none."""
        with self.catalog.session() as session:
            return read_text(session, int(image_id), source)

    def search_by_id(
        self, image_id: int, k: int = 10, min_score: float | None = None, under: Path | str | None = None
    ) -> list[SearchResult]:
        """Images like the indexed image ``image_id``, from its stored vector; it is left out of its own results."""
        return self.search(Query((Term(image_id=int(image_id)),), filters=Filters(under=under)), k, min_score)

    def _encode_file(self, path: Path) -> np.ndarray:
        from retrieval.images import DecodeError, load_image

        try:
            image = load_image(path, self.image_encoder.identity.image_size)
        except DecodeError as error:
            raise UsageError(f"cannot use {path} as a query: {error}") from None
        return self.image_encoder.encode_pil([image])


def _result(rank: int, row: StoredImage, score: float, matched: str = "clip") -> SearchResult:
    clipped = float(min(1.0, max(-1.0, score)))
    return SearchResult(rank, clipped, row.path, row.id, row.width, row.height, row.taken_at, matched=matched)


def _results(scores, ids, rows, min_score, exclude) -> list[SearchResult]:
    results: list[SearchResult] = []
    for score, image_id in zip(scores, ids):
        image_id = int(image_id)
        if image_id < 0 or image_id in exclude or image_id not in rows:
            continue
        if min_score is not None and score < min_score:
            break
        results.append(_result(len(results) + 1, rows[image_id], score))
    return results


def _check_k(k: int) -> None:
    if k < 1:
        raise UsageError("-k must be at least 1")
