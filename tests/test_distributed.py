"""Real 2-rank (and 1- and 3-rank) ZeRO-3 on CPU ranks: partitioning, init, exact resume, PMP.

Each test is one check of tests/dist/scenarios.py, where it sits next to the scenario it
checks; the scenarios share the session's launches (conftest's `dist_results`).
"""
from __future__ import annotations

import pytest

from dist.scenarios import session_checks


@pytest.mark.parametrize("check", session_checks(), ids=str)
def test_scenario(check, dist_results, tmp_path):
    check(dist_results, tmp_path)
