"""README command 1: the quickstart recipe, whole, as a newcomer runs it."""

from __future__ import annotations

import json

import pytest
from helpers import RECIPES, cli


@pytest.mark.slow
def test_quickstart_pipeline_improves_gold_over_sft(tmp_path):
    result = cli("run", str(RECIPES / "quickstart.yaml"), f"run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert report["ppo/gold"] > report["sft/gold"] + 0.5
    assert report["ppo/kl"] > 0 and report["sft/kl"] == 0
    assert 0.7 < report["rm/accuracy"] <= 1.0
    for stage in ("sft", "ppo"):
        assert 1.0 < report[f"{stage}/perplexity"] < 20
        assert report[f"{stage}/length"] > 2
    # the summary tables and the answers after each stage end the output
    assert "quickstart: SFT -> RM -> PPO" in result.stdout
    assert "the same prompts after each stage" in result.stdout
    samples = [json.loads(line) for line in (tmp_path / "report" / "samples.jsonl").read_text().splitlines()]
    assert [s["model"] for s in samples] == ["sft", "ppo"] * 3
