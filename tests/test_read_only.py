"""An index that cannot be written (a read-only disk, a backup, another user's folder) is searched as it is:
no lock file, no WAL, no "corrupt catalog" message; commands that must write say "read-only index" in one line.

Root ignores file modes, so as root the index is shown through a read-only bind mount; where root cannot mount,
the real-file-system test is skipped and only the simulated one (the writability probe answering no) runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipsearch.cli import app
from indexer.pipeline import index_paths
from retrieval.search.engine import SearchEngine
from retrieval.search.server import ServerSettings, create_app
from retrieval.store.catalog import Catalog
from tests.conftest import make_images

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_spec):
    from indexer.pipeline import IndexSettings

    root = tmp_path_factory.mktemp("readonly")
    make_images(root / "photos", 4, seed=61)
    index_paths(root / "index", [root / "photos"], IndexSettings(model=tiny_spec, workers=0, device="cpu"), False)
    return root


@contextmanager
def read_only_view(index: Path, mount_point: Path):
    """``index`` as this process cannot write it: chmod for a normal user, a read-only bind mount for root."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [index, *index.iterdir()]}
        for path in modes:
            path.chmod(modes[path] & ~0o222)
        try:
            yield index
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    mount_point.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(index), str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot bind-mount here ({mounted.stderr.decode().strip()}); see the simulated test")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_read_only_index_is_searched_and_writes_are_refused_in_one_line(built, tmp_path, monkeypatch):
    index = tmp_path / "index"
    shutil.copytree(built / "index", index)
    before = sorted(p.name for p in index.iterdir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with read_only_view(index, tmp_path / "view") as view:
        with SearchEngine(view, device="cpu") as engine:
            assert engine.catalog.read_only and len(engine.search_text("a red car", k=3)) == 3
        for args in (["info"], ["check"], ["search", "trees", "-k", "2", "--device", "cpu"]):
            result = runner.invoke(app, [*args, "--index", str(view)])
            assert result.exit_code == 0, (args, result.output)
            assert "not a readable" not in result.output
        refused = runner.invoke(app, ["index", "--index", str(view)])
        assert refused.exit_code == 1 and refused.output.startswith("clipsearch: read-only index:")
        assert len(refused.output.strip().splitlines()) == 1
        with TestClient(create_app(view, ServerSettings(device="cpu")), base_url="http://127.0.0.1") as client:
            first = client.get("/api/search", params={"q": "sky", "k": 1}).json()["results"][0]
            assert client.get(first["thumbnail_url"]).status_code == 200  # cached outside the index
    assert sorted(p.name for p in index.iterdir()) == before  # no -wal, -shm, lock or thumbnails written


def test_the_read_only_open_is_used_when_the_folder_is_not_writable(built, tmp_path, monkeypatch):
    """Simulated (works as root and without mount): the writability probe says no, so the catalog opens with
    ``mode=ro`` and SQLite itself refuses any write."""
    index = tmp_path / "index"
    shutil.copytree(built / "index", index)
    monkeypatch.setattr("retrieval.store.catalog_reads.writable", lambda path: False)
    catalog = Catalog(index / "catalog.sqlite")
    try:
        assert catalog.read_only and catalog.count() == 4
        with pytest.raises(Exception, match="readonly|read-only"):
            catalog.set_meta("probe", "1")
    finally:
        catalog.close()
