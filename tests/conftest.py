"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import RECIPES, TINY_SFT, cli


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A tiny SFT model and a reward model trained from it (about 10 s, once per session),
    for the RL tests to start from."""
    root = tmp_path_factory.mktemp("sft-rm")
    result = cli("run", str(RECIPES / "reward-model.yaml"), *TINY_SFT, f"run.dir={root}",
                 "stages.sft.trainer.max_steps=30", "stages.rm.trainer.max_steps=10",
                 "stages.rm.trainer.batch_size=16", "stages.rm.trainer.micro_batch_size=16",
                 "stages.rm.eval_data.limit=32", "stages.rm.reference_data.limit=32", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"sft": root / "sft" / "export", "rm": root / "rm" / "export"}
