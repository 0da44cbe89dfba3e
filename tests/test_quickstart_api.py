"""``trimtune.quickstart.quickstart`` takes keyword arguments (QuickstartSettings); the CLI's
parsed flags go through the thin adapter ``quickstart_from_args`` to the same settings."""

from __future__ import annotations

import pytest

import trimtune.quickstart as qs
from trimtune.cli import build_parser


@pytest.fixture
def seen(monkeypatch):
    got = []
    monkeypatch.setattr(qs, "_pipeline", lambda q, work, t0: got.append(q) or {"rows": []})
    return got


def test_keywords_and_defaults(tmp_path, seen):
    qs.quickstart(out=str(tmp_path / "a"), r=4, target_sparsity=0.6, memory=False)
    q = seen[0]
    assert (q.r, q.target_sparsity, q.memory, q.epochs) == (4, 0.6, False, 2)
    with pytest.raises(TypeError, match="rank"):
        qs.quickstart(out=str(tmp_path / "b"), rank=4)


def test_cli_flags_map_to_the_same_settings(tmp_path, seen):
    a = build_parser().parse_args(["quickstart", "--out", str(tmp_path / "a"), "--r", "4",
                                   "--sparsity", "0.6", "--no-memory", "--no-progress"])
    qs.quickstart_from_args(a)
    qs.quickstart(a)  # the Namespace form of this release: the same adapter
    qs.quickstart(out=str(tmp_path / "a"), r=4, target_sparsity=0.6, memory=False,
                  progress=False)
    assert seen[0] == seen[1] == seen[2]
