"""The recipes that ship inside the package (``rlhfkit.recipes``): listed by
``rlhfkit recipes``, written out by ``rlhfkit recipes copy NAME DIR``, and extended by
name with ``extends: [builtin:NAME]`` from an installed wheel as from a checkout."""

from __future__ import annotations

import re
import shutil
from importlib.resources import files
from pathlib import Path

from rlhfkit.errors import UserError

BUILTIN = "builtin:"


def recipes_dir() -> Path:
    """The folder the shipped recipes are installed in."""
    return Path(str(files("rlhfkit.recipes")))


def shipped_recipes() -> dict[str, Path]:
    """``{name: file}``: a recipe's name is its path in the folder without ``.yaml``
    (``quickstart``, ``rm-static/opt-1.3b``, ``ablations/ppo-details``)."""
    root = recipes_dir()
    return {str(path.relative_to(root).with_suffix("")): path for path in sorted(root.rglob("*.yaml"))}


def shipped_recipe(name: str) -> Path:
    """The file of the shipped recipe ``name`` (a ``.yaml`` ending is allowed)."""
    known = shipped_recipes()
    path = known.get(name.removesuffix(".yaml"))
    if path is None:
        raise UserError(f"no shipped recipe {name!r}; `rlhfkit recipes` lists them: {', '.join(known)}.")
    return path


def describe(path: Path) -> str:
    """The first sentence of a recipe's opening comment (after its command line)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("rlhfkit "):
            continue
        if not text:
            if words:
                break
            continue
        words.append(text)
    paragraph = " ".join(words)
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s", paragraph)  # not "et al. ", "e.g. ", "i.e. "
    return paragraph if end is None else paragraph[:end.start() + 1]


def _parents(path: Path) -> list[Path]:
    """The files ``path`` names through ``extends:`` (relative ones) or an ablation's
    ``recipe:``, transitively."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    names = data.get("extends", [])
    names = [names] if isinstance(names, str) else list(names)
    if isinstance(data.get("recipe"), str):
        names.append(data["recipe"])
    found: list[Path] = []
    for name in names:
        if ":" in name:  # preset:NAME, builtin:NAME
            continue
        parent = (path.parent / name).resolve()
        found += [parent, *_parents(parent)]
    return found


def copy_recipe(name: str, target: Path, force: bool = False) -> list[Path]:
    """Write the shipped recipe ``name`` and every file it builds on into ``target``,
    keeping their relative layout so its ``extends:`` still resolve; returns the files
    written. Existing files are refused unless ``force``."""
    root = recipes_dir().resolve()
    source = shipped_recipe(name).resolve()
    files_ = list(dict.fromkeys([source, *_parents(source)]))
    destinations = [(path, target / path.relative_to(root)) for path in files_]
    clash = [str(dest) for _, dest in destinations if dest.exists()]
    if clash and not force:
        raise UserError(f"{', '.join(clash)} already exist{'s' if len(clash) == 1 else ''}; copy into another folder "
                        f"or pass --force to overwrite.")
    for path, dest in destinations:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return [dest for _, dest in destinations]
