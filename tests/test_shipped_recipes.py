"""The recipes ship inside the package: listed, copied out, and extended by name, from a
built wheel as from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from helpers import REPO, cli


def test_recipes_lists_every_shipped_recipe_with_what_it_runs(tmp_path):
    result = cli("recipes", cwd=tmp_path, env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    for name in ("quickstart", "ablations/ppo-details", "rm-static/opt-1.3b", "dpo"):
        assert f"│ {name} " in result.stdout
    assert "The quickstart: the whole InstructGPT pipeline" in result.stdout


def test_copy_writes_the_recipe_and_what_it_extends_and_refuses_to_overwrite(tmp_path):
    result = cli("recipes", "copy", "quickstart", "mine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == \
        ["ppo.yaml", "quickstart.yaml", "reward-model.yaml", "sft.yaml"]
    assert cli("validate", "mine/quickstart.yaml", cwd=tmp_path).returncode == 0
    again = cli("recipes", "copy", "quickstart", "mine", cwd=tmp_path)
    assert again.returncode == 2 and "already exist" in again.stderr and "--force" in again.stderr
    assert cli("recipes", "copy", "quickstart", "mine", "--force", cwd=tmp_path).returncode == 0
    ablation = cli("recipes", "copy", "ablations/xu-tips", "abl", cwd=tmp_path)
    assert ablation.returncode == 0, ablation.stderr
    assert (tmp_path / "abl" / "ablations" / "xu-tips.yaml").is_file() and (tmp_path / "abl" / "ppo.yaml").is_file()
    assert cli("ablate", "abl/ablations/xu-tips.yaml", "--validate", cwd=tmp_path).returncode == 0


def test_a_recipe_extends_a_shipped_one_by_name(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: [builtin:ppo]\nrun: {name: mine}\n"
                                        "stages: {ppo: {trainer: {max_steps: 8}}}\n")
    result = cli("validate", "mine.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "bad.yaml").write_text("extends: [builtin:nope]\nrun: {name: x}\n")
    result = cli("validate", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "no shipped recipe 'nope'" in result.stderr and "quickstart" in result.stderr


def test_the_wheel_carries_the_recipes_and_the_labelling_page_and_builtin_extends_works_from_it(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next((tmp_path / "dist").glob("rlhfkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("rlhfkit/recipes/quickstart.yaml", "rlhfkit/recipes/ablations/ppo-details.yaml",
                 "rlhfkit/recipes/rm-static/opt-1.3b.yaml", "rlhfkit/recipes/sft.yaml",
                 "rlhfkit/recipes/human-feedback/round.yaml", "rlhfkit/label/static/index.html",
                 "rlhfkit/label/static/label.js", "rlhfkit/label/static/agreement.html"):
        assert name in names, name
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stdout + install.stderr
    # the installed copy comes first on the path; the checkout is not reachable from the working directory
    code = ("import rlhfkit, rlhfkit.shipped as s; from rlhfkit.recipe import compose; from pathlib import Path\n"
            "assert str(s.recipes_dir()).startswith(str(Path(rlhfkit.__file__).parent)), s.recipes_dir()\n"
            "p = Path('mine.yaml'); p.write_text('extends: [builtin:quickstart]\\nrun: {name: m}\\n')\n"
            "data, _ = compose(p, {}); print(rlhfkit.__file__, sorted(data['stages']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith(str(target)) and "['ppo', 'report', 'rm', 'sft']" in run.stdout
