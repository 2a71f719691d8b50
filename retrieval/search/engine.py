"""SearchEngine: open an index folder and answer text, image and vector queries with catalog rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import EmptyIndexError, UsageError
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelIdentity, ModelSpec, spec_key
from retrieval.store.catalog import STATUS_OK, Catalog, ImageRow
from retrieval.store.layout import IndexLayout
from retrieval.store.paths import catalog_path, display_path
from retrieval.store.sync import open_vectors
from retrieval.store.vectors import VectorIndex
from retrieval.unit import unit_rows

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class SearchResult:
    rank: int
    score: float
    path: str
    image_id: int
    width: int | None
    height: int | None

    def to_dict(self) -> dict:
        """JSON-ready: a file name that is not valid UTF-8 shows its odd bytes as ``\\xNN`` (``.path`` keeps
        them exactly, for opening the file)."""
        return asdict(self) | {"path": display_path(self.path)}


class SearchEngine:
    """Read side of an index. The model loads on the first query that needs it; the index on the first search."""

    def __init__(
        self, index_dir: Path | str, device: str = "auto", model: ModelSpec | None = None, text_bf16: bool = False
    ):
        self.layout = IndexLayout(Path(index_dir).expanduser())
        self.catalog = Catalog(self.layout.catalog, create=False)
        self.device = device
        self.text_bf16 = text_bf16  # CPU: encode text queries with a bfloat16 text tower (see Encoder.load_text)
        self.identity: ModelIdentity | None = self.catalog.model_identity()
        if model is not None:
            self.catalog.check_model(spec_key(model), model.describe())
        self._encoder: Encoder | None = None
        self._vectors: VectorIndex | None = None

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model_spec(self) -> ModelSpec:
        if self.identity is None:
            raise EmptyIndexError(f"the index at {self.layout.root} is empty: run `clipsearch index FOLDER` first")
        return ModelSpec(self.identity.name, self.identity.pretrained)

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            spec = self.model_spec
            self.catalog.check_model(spec_key(spec), spec.describe())
            self._encoder = Encoder.load(spec, self.device)
        return self._encoder

    @property
    def text_encoder(self) -> Encoder:
        """For text queries: the full encoder once loaded, else only the text tower (faster start, less memory)."""
        if self._encoder is not None and not self.text_bf16:
            return self._encoder
        spec = self.model_spec
        self.catalog.check_model(spec_key(spec), spec.describe())
        return Encoder.load_text(spec, self.device, bf16=self.text_bf16)

    @property
    def vectors(self) -> VectorIndex:
        if self._vectors is None:
            self.model_spec  # noqa: B018  (raises on an index that has no images yet)
            vectors = open_vectors(self.catalog, self.layout, self.identity.embed_dim, persist=False)
            vectors.use_device(self.device)  # GPU search with CUDA (retrieval.store.gpu), else the CPU
            if not len(vectors):
                raise EmptyIndexError(f"no images are indexed in {self.layout.root} yet")
            self._vectors = vectors
        return self._vectors

    def refresh(self) -> None:
        """Pick up what an indexer committed since this engine opened."""
        self.identity = self.catalog.model_identity()
        self._vectors = None

    # --- queries --------------------------------------------------------------------------------------------

    def search_text(self, text: str, k: int = 10, min_score: float | None = None, under: Path | str | None = None):
        if not text.strip():
            raise UsageError("the query text is empty")
        _check_k(k)
        self.vectors  # noqa: B018  (fail on an empty index before loading the model)
        query = self.text_encoder.encode_texts([text])
        return self._search(query, k, min_score, under, exclude=())

    def search_image(
        self, image: Path | str | Image.Image, k: int = 10, min_score: float | None = None, under=None
    ) -> list[SearchResult]:
        """Images like ``image``; an indexed query image is left out of its own results."""
        _check_k(k)
        self.vectors  # noqa: B018
        exclude: tuple[int, ...] = ()
        if isinstance(image, (str, Path)):
            path = Path(image).expanduser()
            if not path.is_file():
                raise UsageError(f"no such image file: {path}")
            row = self.catalog.row_by_path(catalog_path(path))
            if row is not None and row.status == STATUS_OK:
                query = unit_rows(row.vector()[None, :])
                exclude = (row.id,)
            else:
                query = self._encode_file(path)
        else:
            query = self.encoder.encode_pil([image])
        return self._search(query, k, min_score, under, exclude=exclude)

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[SearchResult]]:
        """Raw FAISS search for many query vectors at once (used by evaluation)."""
        _check_k(k)
        scores, ids = self.vectors.search(queries, k)
        rows = self.catalog.rows_by_id(sorted({int(i) for i in ids.ravel() if i >= 0}))
        return [_results(score_row, id_row, rows, None, ()) for score_row, id_row in zip(scores, ids)]

    def vectors_for_paths(self, paths: list[str | Path]) -> np.ndarray:
        """Stored normalised embeddings in the order given; every path must be indexed successfully."""
        keys = [catalog_path(p) for p in paths]
        rows = self.catalog.rows_by_paths(keys)
        missing = [key for key in keys if key not in rows or rows[key].status != STATUS_OK]
        if missing:
            raise UsageError(f"{len(missing)} image(s) are not indexed, e.g. {missing[0]}")
        return unit_rows(np.stack([rows[key].vector() for key in keys]))

    def row(self, image_id: int) -> ImageRow | None:
        """The catalog row of an indexed image (ok or failed), or None: how the web app maps ids to files."""
        return self.catalog.rows_by_id([int(image_id)]).get(int(image_id))

    def search_by_id(
        self, image_id: int, k: int = 10, min_score: float | None = None, under: Path | str | None = None
    ) -> list[SearchResult]:
        """Images like the indexed image ``image_id``, from its stored vector; it is left out of its own results."""
        _check_k(k)
        self.vectors  # noqa: B018
        row = self.row(image_id)
        if row is None or row.status != STATUS_OK:
            raise UsageError(f"no indexed image has id {image_id}")
        return self._search(unit_rows(row.vector()[None, :]), k, min_score, under, exclude=(row.id,))

    def _encode_file(self, path: Path) -> np.ndarray:
        from retrieval.images import DecodeError, load_image

        try:
            image = load_image(path, self.encoder.identity.image_size)
        except DecodeError as error:
            raise UsageError(f"cannot use {path} as a query: {error}") from None
        return self.encoder.encode_pil([image])

    def _search(self, query: np.ndarray, k: int, min_score, under, exclude) -> list[SearchResult]:
        allowed = None
        if under is not None:
            folder = Path(under).expanduser()
            if not folder.is_dir():
                raise UsageError(f"no such folder: {folder}")
            allowed = self.catalog.ids_under(str(folder.resolve()))
            if not len(allowed):
                return []
        scores, ids = self.vectors.search(query, k + len(exclude), allowed)
        rows = self.catalog.rows_by_id([int(i) for i in ids[0] if i >= 0])
        return _results(scores[0], ids[0], rows, min_score, exclude)[:k]


def _results(scores, ids, rows, min_score, exclude) -> list[SearchResult]:
    results: list[SearchResult] = []
    for score, image_id in zip(scores, ids):
        image_id = int(image_id)
        if image_id < 0 or image_id in exclude or image_id not in rows:
            continue
        if min_score is not None and score < min_score:
            break
        row = rows[image_id]
        clipped = float(min(1.0, max(-1.0, score)))
        results.append(SearchResult(len(results) + 1, clipped, row.path, image_id, row.width, row.height))
    return results


def _check_k(k: int) -> None:
    if k < 1:
        raise UsageError("-k must be at least 1")
