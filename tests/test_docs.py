"""Documentation that cannot drift: the generated contracts page, the list of built-in
plugins in the plugin guide, and every relative link in the README and docs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import rlhfkit
from rlhfkit.docgen import contracts_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_contracts_page_is_generated_from_the_declarations():
    expected = contracts_markdown(rlhfkit.load_plugins().registry)
    assert (ROOT / "docs" / "contracts.md").read_text() == expected, "run: python -m rlhfkit.docgen"


def test_the_plugin_guide_lists_every_builtin_plugin():
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["rlhfkit"]
    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    listed = re.search(r"registers its built-in plugins\n\((.*?)\) in the same group", guide, re.DOTALL).group(1)
    assert {name.strip(" `\n") for name in listed.split(",")} == set(entry_points)


def test_relative_links_resolve():
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for match in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", page.read_text()):
            target = match.group(1)
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
