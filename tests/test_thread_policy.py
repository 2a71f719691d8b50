"""A program that uses the library, not only the `clipsearch` command, gets idle OpenMP threads that sleep
(OMP_WAIT_POLICY=PASSIVE, retrieval/__init__.py), set before FAISS or torch loads; a user's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = """
import os, sys
import {module}
print(os.environ.get("OMP_WAIT_POLICY"), "faiss" in sys.modules or "torch" in sys.modules)
"""


def policy_after_import(module: str, setting: str | None = None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if setting is not None:
        env["OMP_WAIT_POLICY"] = setting
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(module=module)], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()[0]


@pytest.mark.parametrize(
    "module", ["retrieval.store.vectors", "retrieval.search.engine", "indexer.pipeline", "clipsearch.cli"]
)
def test_the_library_makes_idle_openmp_threads_sleep(module):
    assert policy_after_import(module) == "PASSIVE"


def test_a_users_own_setting_wins():
    assert policy_after_import("retrieval.search.engine", "ACTIVE") == "ACTIVE"
