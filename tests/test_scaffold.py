"""`rlhfkit new KIND NAME`: a plugin distribution with one working component whose own
tests (rlhfkit.testing only) pass after `pip install -e`, and whose recipe validates."""

from __future__ import annotations

import os
import site
import subprocess
import sys

import pytest
from helpers import cli

KINDS = ("estimator", "objective", "constraint", "reward")


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, **kwargs)


def test_each_kind_installs_and_passes_its_own_tests(tmp_path):
    for kind in KINDS:
        result = cli("new", kind, f"my-{kind}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "pip install -e '.[test]'" in " ".join(result.stdout.split())
    # a fresh environment that sees this one's packages (rlhfkit, torch, pytest) and nothing installed in it
    env_dir = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)]).returncode == 0
    python = env_dir / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    with open(os.path.join(purelib, "outer.pth"), "w") as handle:
        handle.write("".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages()))
    packages = [str(tmp_path / f"rlhfkit-my-{kind}") for kind in KINDS]
    installed = run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                     "--no-index", *(arg for p in packages for arg in ("-e", p))])
    assert installed.returncode == 0, installed.stderr
    tests = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"{p}/tests" for p in packages)],
                cwd=tmp_path)
    assert tests.returncode == 0 and "8 passed" in tests.stdout, tests.stdout + tests.stderr
    listed = run([str(python), "-m", "rlhfkit", "plugins", "estimator"], env={**os.environ, "COLUMNS": "200"})
    assert "my-estimator" in listed.stdout and "rlhfkit-my-estimator 0.1.0" in " ".join(listed.stdout.split())
    for kind, package in zip(KINDS, packages, strict=True):
        valid = run([str(python), "-m", "rlhfkit", "validate", "recipe.yaml"], cwd=package)
        assert valid.returncode == 0, (kind, valid.stdout + valid.stderr)


@pytest.mark.parametrize(("args", "says"), [
    (["new", "scorer", "x"], "invalid choice: 'scorer'"),
    (["new", "estimator", "My_Adv"], "use lowercase letters, digits and single dashes"),
])
def test_bad_names_are_refused(tmp_path, args, says):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and says in result.stderr


def test_a_folder_that_is_not_empty_is_kept(tmp_path):
    (tmp_path / "rlhfkit-my-adv").mkdir()
    (tmp_path / "rlhfkit-my-adv" / "mine.txt").write_text("keep me")
    result = cli("new", "estimator", "my-adv", cwd=tmp_path)
    assert result.returncode == 2 and "--force" in result.stderr
    assert (tmp_path / "rlhfkit-my-adv" / "mine.txt").read_text() == "keep me"
