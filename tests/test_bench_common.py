"""bench/common.py records the commit a measurement ran at: in a clone, with packed refs, and in
a git worktree (whose .git is a file pointing elsewhere)."""
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import common  # noqa: E402


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q", "-b", "main")
    (r / "f").write_text("x")
    _git(r, "add", "f")
    _git(r, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return r


def test_commit_of_a_clone_with_loose_then_packed_refs(repo, monkeypatch):
    monkeypatch.setattr(common, "REPO", str(repo))
    head = _git(repo, "rev-parse", "HEAD")
    assert common._git_commit() == head
    _git(repo, "pack-refs", "--all")
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert common._git_commit() == head


def test_commit_of_a_worktree_is_its_own_head(repo, monkeypatch):
    wt = repo.parent / "wt"
    _git(repo, "worktree", "add", "-q", "-b", "side", str(wt))
    (wt / "g").write_text("y")
    _git(wt, "add", "g")
    _git(wt, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    monkeypatch.setattr(common, "REPO", str(wt))
    assert (wt / ".git").is_file()
    assert common._git_commit() == _git(wt, "rev-parse", "HEAD") != _git(repo, "rev-parse", "HEAD")
