"""The ``rlhfkit`` command line: run, ablate, validate, recipes, new, label, plugins, schema."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from rlhfkit.errors import UserError
from rlhfkit.plugin_manager import BLOCK_ENV, Plugins, load_plugins
from rlhfkit.recipe import recipe_schema
from rlhfkit.registry import KINDS

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit",
        description="Align language models with feedback. Recipes are YAML; every component is a plugin.",
    )
    parser.add_argument("--block-plugin", action="append", default=[], metavar="NAME",
                        help=f"do not load this plugin (repeatable; also {BLOCK_ENV}=a,b)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe (finished stages are skipped, interrupted ones resume)")
    run.add_argument("recipe", help="path to a YAML recipe")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe values")

    validate = sub.add_parser("validate", help="check a recipe and report every problem")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*", metavar="key.path=value")

    ablate = sub.add_parser("ablate", help="run variants of a recipe over seeds; CSV, table and plots")
    ablate.add_argument("ablation", help="path to an ablation YAML file (see docs/ablations.md)")
    ablate.add_argument("overrides", nargs="*", metavar="key.path=value", help="override every variant's recipe")
    ablate.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds per variant (run.seed + 0..N-1; default: the file's `seeds`, else 1)")
    ablate.add_argument("--jobs", type=int, default=1, metavar="J", help="runs at once (each gets cores / J threads)")
    ablate.add_argument("--validate", action="store_true", help="only check the file and every variant's recipe")

    recipes = sub.add_parser("recipes", help="list the recipes that ship with rlhfkit, or copy one out")
    recipes.add_argument("action", nargs="?", choices=["list", "copy"], default="list")
    recipes.add_argument("name", nargs="?", help="copy: the recipe (as `rlhfkit recipes` lists it)")
    recipes.add_argument("directory", nargs="?", help="copy: where to write it (and the files it extends)")
    recipes.add_argument("--force", action="store_true", help="copy: overwrite files that exist")

    new = sub.add_parser("new", help="write a plugin distribution with one working, tested component")
    new.add_argument("kind", choices=["estimator", "objective", "constraint", "reward"])
    new.add_argument("name", help="the component's name, e.g. my-adv (the distribution is rlhfkit-NAME)")
    new.add_argument("--dir", help="where to write it (default: ./rlhfkit-NAME)")
    new.add_argument("--force", action="store_true", help="write into a folder that is not empty")

    label = sub.add_parser("label", add_help=False,
                           help="rank K responses per prompt in the browser; export, agreement "
                                "(rlhfkit label --help)")
    label.add_argument("label_args", nargs=argparse.REMAINDER)

    plugins = sub.add_parser("plugins", help="list installed components with their settings")
    plugins.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")

    schema = sub.add_parser("schema", help="print the JSON Schema of recipes (for editors)")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "label":  # its own parser: options before the session (--help) land in `unknown`
        args.label_args = [*unknown, *args.label_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("run", "ablate"):
        # MKL may pick kernels by memory alignment, which differs between processes: strict
        # conditional reproducibility keeps a resumed run bit-identical (set before MKL starts)
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    console = Console()
    try:
        if args.command == "label":  # needs no plugin unless it samples from a stage
            from rlhfkit.label.cli import main as label_main

            label_main(args.label_args, console)
            return 0
        plugins = load_plugins(block=args.block_plugin)
        if args.command == "run":
            recipe = plugins.load_recipe(args.recipe, args.overrides)
            from rlhfkit.runner import run_recipe  # torch/lightning only once the recipe is valid

            run_recipe(recipe, plugins, console)
        elif args.command == "ablate":
            from rlhfkit.ablate import load_ablation, run_ablation

            if args.seeds is not None and args.seeds < 1 or args.jobs < 1:
                raise UserError("--seeds and --jobs take a whole number of at least 1")
            ablation = load_ablation(args.ablation, plugins, args.seeds, args.overrides)
            if args.validate:
                console.print(f"[green]ok[/]: {args.ablation} is valid; variants: {', '.join(ablation.spec.variants)}; "
                              f"seeds {ablation.seeds}; shared stages per seed: "
                              f"{', '.join(ablation.shared[ablation.seeds[0]]) or 'none'}")
            else:
                run_ablation(ablation, args.jobs, console)
        elif args.command == "validate":
            recipe = plugins.load_recipe(args.recipe, args.overrides)
            stages = ", ".join(f"{s.name} ({s.algorithm.name})" for s in recipe.stages)
            console.print(f"[green]ok[/]: {args.recipe} is valid; stages: {stages}; run directory {recipe.run_dir}")
        elif args.command == "recipes":
            show_recipes(args, console)
        elif args.command == "plugins":
            show_plugins(plugins, args.kind, console)
        elif args.command == "new":
            from pathlib import Path

            from rlhfkit.scaffold import new_plugin

            root = new_plugin(args.kind, args.name, Path(args.dir) if args.dir else None, args.force)
            console.print(f"wrote {root}: a plugin with the {args.kind} {args.name!r}, its test and a recipe. Next: "
                          f"cd {root} && pip install -e '.[test]' && pytest && rlhfkit validate recipe.yaml",
                          highlight=False, markup=False, soft_wrap=True)
        elif args.command == "schema":
            text = json.dumps(recipe_schema(plugins.registry), indent=2)
            if args.output:
                with open(args.output, "w") as handle:
                    handle.write(text + "\n")
            else:
                print(text)
    except UserError as exc:
        _print_error(exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # the runner's Interrupted says where; elsewhere nothing was under way
        Console(stderr=True, highlight=False).print(
            str(exc) or "interrupted; re-run the same command to resume from the last checkpoint", markup=False,
            soft_wrap=True)
        return 130
    return 0


def show_recipes(args: argparse.Namespace, console: Console) -> None:
    from pathlib import Path

    from rlhfkit.shipped import copy_recipe, describe, shipped_recipes

    if args.action == "copy":
        if not args.name or not args.directory:
            raise UserError("usage: rlhfkit recipes copy NAME DIRECTORY (names: `rlhfkit recipes`)")
        written = copy_recipe(args.name, Path(args.directory), force=args.force)
        console.print(f"wrote {', '.join(str(p) for p in written)}; run it with: rlhfkit run {written[0]}",
                      highlight=False)
        return
    table = Table(title="recipes shipped with rlhfkit (extends: \\[builtin:NAME], or rlhfkit recipes copy NAME DIR)")
    table.add_column("name")
    table.add_column("what it runs")
    for name, path in shipped_recipes().items():
        table.add_row(name, describe(path))
    console.print(table)


def _print_error(exc: UserError) -> None:
    err = Console(stderr=True, highlight=False)
    err.print("[bold red]error:[/] ", end="")
    err.print(str(exc), markup=False, soft_wrap=True)


def show_plugins(plugins: Plugins, kind: str | None, console: Console) -> None:
    specs = plugins.registry.specs(kind)
    if not specs:
        console.print(f"no {kind or ''} components installed")
        return
    for spec in specs:
        table = Table(title=f"{spec.kind} [bold]{spec.name}[/] — {spec.doc}", title_justify="left",
                      caption=f"from {spec.where()}", caption_justify="left", show_edge=False)
        table.add_column("setting")
        table.add_column("type")
        table.add_column("default")
        table.add_column("description")
        for name, field in spec.config.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            table.add_row(field.alias or name, _type_name(field.annotation), default, field.description or "")
        for slot_name, slot in spec.slots.items():
            need = "required" if slot.required else "optional"
            table.add_row(f"[slot] {slot_name}", slot.kind + ("[]" if slot.many else ""), need, slot.doc)
        console.print(table)
        console.print()
    if plugins.presets and kind is None:
        console.print("presets (use with extends: [preset:NAME]): " + ", ".join(sorted(plugins.presets)))


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("rlhfkit.registry.", "")


if __name__ == "__main__":
    sys.exit(main())
