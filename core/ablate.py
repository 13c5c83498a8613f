"""``rlhfkit ablate``: variants of one recipe side by side, over seeds.

An ablation file names a base recipe and its variants; each variant is the base plus
presets or recipe files (``extends``) and dotted settings (``set``)::

    # rlhfkit ablate recipes/ablations/ppo-details.yaml --seeds 2
    recipe: ../ppo.yaml                  # the base, relative to this file
    set: {stages.ppo.trainer.max_steps: 80}        # applied to every variant
    variants:
      vanilla: {set: {stages.ppo.constraints: []}}
      ppo-max: {extends: ["preset:ppo-max"]}
    table: [gold, proxy, kl, length]     # summary keys of the compared stage
    plots: [eval/gold, rollout/kl]       # metrics.csv columns, one PNG each

Every variant runs with the same seeds (``run.seed`` + 0 .. N-1) and so the same data.
Per seed, the leading stages that are identical in every variant (e.g. SFT and the
reward model) run once, in ``seed-S/_shared/``, and each variant's directory links to
them. Runs are separate processes, ``--jobs`` at a time; a finished run is skipped, an
interrupted one resumes from its checkpoint. Run directory::

    runs/ablations/<name>/seed-S/<variant>/   one recipe run (rlhfkit run layout)
    runs/ablations/<name>/logs/               each run's output
    runs/ablations/<name>/metrics.csv         variant, seed, stage, step, metric, value
    runs/ablations/<name>/table.csv, table.md final metrics, mean and std over seeds
    runs/ablations/<name>/plots/*.png         one per metric, a line per variant, a band
    runs/ablations/<name>/plots/final_*.png   one per table metric, a bar per variant
"""

from __future__ import annotations

import copy
import csv
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table

from rlhfkit.errors import Problem, RecipeError, UserError
from rlhfkit.files import atomic_write_text
from rlhfkit.provenance import code_changes, stage_code, upstream_changes
from rlhfkit.recipe import (
    Recipe,
    apply_override,
    checked,
    compose,
    compose_parent,
    deep_merge,
    merge_origins,
    read_yaml,
    set_value,
)
from rlhfkit.registry import error_message
from rlhfkit.rundir import read_json_file

SHARED = "_shared"
DONE_NAME = "DONE.json"


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    doc: str = Field("", description="one line: what this variant changes")
    extends: list[str] = Field(default_factory=list,
                               description="presets (preset:NAME) or recipe files merged over the base, in order")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted settings, e.g. {stages.ppo.lr: 1e-5}")


class AblationFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str = Field(description="the base recipe, relative to the ablation file")
    name: str | None = Field(None, description="runs go to runs/ablations/<name> (default: the file's stem)")
    dir: str | None = Field(None, description="the run directory (overrides name)")
    seeds: int = Field(1, ge=1, description="seeds per variant when --seeds is not given")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted settings applied to every variant")
    variants: dict[str, Variant] = Field(min_length=1)
    stage: str | None = Field(None, description="the stage compared (default: each variant's last stage)")
    table: list[str] = Field(default_factory=list,
                             description="summary keys shown as mean ± std (default: every numeric key)")
    plots: list[str] = Field(default_factory=list, description="metrics.csv columns plotted against the step")


@dataclass
class Ablation:
    path: Path
    spec: AblationFile
    root: Path
    seeds: list[int]
    recipes: dict[tuple[str, int], Recipe]  # (variant, seed) -> its recipe
    shared: dict[int, list[str]]  # seed -> names of the leading stages every variant shares
    registry: Any = None  # the plugins' registry: which code each stage runs (rlhfkit.provenance)

    def stage_of(self, variant: str) -> str:
        return self.spec.stage or self.recipes[(variant, self.seeds[0])].stages[-1].name


@dataclass
class Job:
    """One ``rlhfkit run``: a variant at a seed, or the stages shared at a seed."""

    name: str
    recipe_file: Path
    run_dir: Path
    stages: list[tuple[str, str]]  # (stage, fingerprint) it must finish
    code: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> the code it runs (provenance)
    data: dict[str, Any] = field(default_factory=dict)  # the resolved recipe it runs
    links: list[str] = field(default_factory=list)  # stages linked from seed-S/_shared
    after: str | None = None
    state: str = "pending"
    seconds: float = 0.0
    log: Path = field(default_factory=Path)

    def finished(self) -> bool:
        return not self.stale()

    def stale(self) -> str:
        """Why the job has to run ('' when every stage finished with these settings and code)."""
        finishes: dict[str, str] = {}
        for stage, fingerprint in self.stages:
            info, _ = read_json_file(self.run_dir / stage / DONE_NAME, ("fingerprint",))
            if info is None:
                return f"stage {stage} has not finished"
            if info["fingerprint"] != fingerprint:
                return f"stage {stage}'s settings changed"
            changed = code_changes(info.get("code"), self.code[stage]) if stage in self.code else ""
            if changed:
                return f"stage {stage}'s code changed: {changed}"
            redone = upstream_changes(info.get("upstream"), finishes)
            if redone:
                return f"stage {stage} was trained on an earlier finish of {redone}"
            finishes[stage] = str(info.get("id", ""))
        return ""


# ------------------------------------------------------------------ loading


def load_ablation(path: str | Path, plugins: Any, seeds: int | None = None, overrides: list[str] = ()) -> Ablation:
    """Read an ablation file and validate every variant's recipe; raise one error
    listing every problem of every variant."""
    from rlhfkit.runner import stage_fingerprint

    path = Path(path)
    raw = read_yaml(path)
    try:
        spec = AblationFile.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError([Problem(str(path), ".".join(str(p) for p in err["loc"]), error_message(err))
                           for err in exc.errors()]) from None
    root = Path(spec.dir) if spec.dir else Path("runs") / "ablations" / (spec.name or path.stem)
    base_path = path.parent / spec.recipe
    base, base_origins = compose(base_path, plugins.presets)
    first_seed = int((base.get("run") or {}).get("seed", 0))
    seed_list = [first_seed + i for i in range(seeds or spec.seeds)]
    problems: list[Problem] = []
    recipes: dict[tuple[str, int], Recipe] = {}
    for name, variant in spec.variants.items():
        where = f"{path} (variant {name})"
        try:
            data, origins = _variant_data(path, base, base_origins, spec, name, variant, plugins.presets)
            for item in overrides:
                apply_override(data, item)
                origins[item.split("=", 1)[0]] = "command line"
        except RecipeError as exc:
            problems += exc.problems
            continue
        except UserError as exc:
            problems.append(Problem(where, f"variants.{name}", str(exc)))
            continue
        for seed in seed_list:
            seeded = copy.deepcopy(data)
            seeded.setdefault("run", {}).update({"seed": seed, "dir": str(root / f"seed-{seed}" / name),
                                                 "name": f"{root.name}-{name}-seed{seed}",
                                                 "ablation": root.name, "variant": name,
                                                 "tracker_dir": str(root)})
            try:
                recipes[(name, seed)] = checked(seeded, base_path, plugins.registry, origins, plugins.check_recipe)
            except RecipeError as exc:
                problems += [Problem(f"{p.file} (variant {name})", p.path, p.message, p.hint) for p in exc.problems]
                break
    if problems:
        raise RecipeError(problems)
    if spec.stage is not None:
        missing = [n for n in spec.variants if spec.stage not in {s.name for s in recipes[(n, seed_list[0])].stages}]
        if missing:
            raise UserError(f"{path}: stage: {spec.stage!r} is not a stage of variant(s) {', '.join(missing)}; "
                            f"name a stage every variant has, or leave `stage:` out to compare each one's last stage.")
    shared: dict[int, list[str]] = {}
    for seed in seed_list:
        lists = [[(s.name, stage_fingerprint(s)) for s in recipes[(n, seed)].stages] for n in spec.variants]
        common: list[str] = []
        for column in zip(*lists, strict=False):
            if len(set(column)) != 1:
                break
            common.append(column[0][0])
        # a variant needs at least one stage of its own, else it would equal the shared run
        shared[seed] = common[: min(len(x) for x in lists) - 1] if len(spec.variants) > 1 else []
    return Ablation(path, spec, root, seed_list, recipes, shared, plugins.registry)


def _variant_data(path: Path, base: dict, base_origins: dict, spec: AblationFile, name: str, variant: Variant,
                  presets: dict[str, dict]) -> tuple[dict, dict]:
    data = copy.deepcopy(base)
    origins = dict(base_origins)
    for parent in variant.extends:
        layer, layer_origins = compose_parent(parent, path, presets)
        merge_origins(origins, data, layer, layer_origins)
        data = deep_merge(data, copy.deepcopy(layer))
    for source, settings in ((f"{path}: set", spec.set), (f"{path}: variants.{name}.set", variant.set)):
        for dotted, value in settings.items():
            set_value(data, dotted, copy.deepcopy(value))
            origins[dotted] = source
    return data, origins


# ------------------------------------------------------------------ running


def plan(ablation: Ablation) -> list[Job]:
    """The runs: per seed, the shared stages first, then every variant."""
    from rlhfkit.runner import stage_fingerprint

    jobs: list[Job] = []
    recipe_dir = ablation.root / "recipes"
    for seed in ablation.seeds:
        seed_dir = ablation.root / f"seed-{seed}"
        shared = ablation.shared[seed]
        shared_job = None
        if shared:
            first = ablation.recipes[(next(iter(ablation.spec.variants)), seed)]
            data = copy.deepcopy(first.data)
            data["stages"] = {k: v for k, v in data["stages"].items() if k in shared}
            data["run"].update({"dir": str(seed_dir / SHARED), "variant": "shared",
                                "name": f"{ablation.root.name}-shared-seed{seed}"})
            shared_job = Job(f"seed {seed} shared ({', '.join(shared)})", recipe_dir / f"seed-{seed}-{SHARED}.yaml",
                             seed_dir / SHARED, [(s.name, stage_fingerprint(s)) for s in first.stages
                                                 if s.name in shared], data=data, code=_code(ablation, first))
            jobs.append(shared_job)
        for variant in ablation.spec.variants:
            recipe = ablation.recipes[(variant, seed)]
            jobs.append(Job(f"seed {seed} {variant}", recipe_dir / f"seed-{seed}-{variant}.yaml", recipe.run_dir,
                            [(s.name, stage_fingerprint(s)) for s in recipe.stages], data=recipe.data,
                            links=list(shared), after=shared_job.name if shared_job else None,
                            code=_code(ablation, recipe)))
    for job in jobs:
        job.log = ablation.root / "logs" / (job.recipe_file.stem + ".log")
    return jobs


def _code(ablation: Ablation, recipe: Recipe) -> dict[str, dict[str, str]]:
    """Each stage's code (rlhfkit.provenance), when the ablation knows its plugins."""
    if ablation.registry is None:
        return {}
    return {stage.name: stage_code(stage, ablation.registry) for stage in recipe.stages}


def run_ablation(ablation: Ablation, jobs_at_once: int = 1, console: Console | None = None,
                 launch: Callable[[Job, dict[str, str]], int] | None = None) -> dict[str, Any]:
    """Run every pending job, ``jobs_at_once`` in parallel; then collect the CSV, the
    table and the plots. Returns ``{"jobs": [...], "table": rows}``."""
    console = console or Console()
    launch = launch or _launch
    jobs = plan(ablation)
    for job in jobs:
        atomic_write_text(job.recipe_file, f"# written by rlhfkit ablate from {ablation.path}\n"
                          + yaml.safe_dump(job.data, sort_keys=False))
        for stage in job.links:
            link = job.run_dir / stage
            if not link.exists() and not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path("..") / SHARED / stage, target_is_directory=True)
        why = job.stale()
        if not why:
            job.state = "skipped"
        elif "has not finished" not in why:
            console.print(f"  [yellow]stale[/] {job.name}: {why}; running it again", highlight=False)
    pending = [j for j in jobs if j.state == "pending"]
    skipped = len(jobs) - len(pending)
    threads = max(1, (os.cpu_count() or 1) // jobs_at_once)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    console.print(f"[bold]ablate {ablation.path}[/]: {len(ablation.spec.variants)} variants × "
                  f"{len(ablation.seeds)} seeds; {len(pending)} runs to do, {skipped} already finished; "
                  f"{jobs_at_once} at a time, {threads} thread(s) each; runs in {ablation.root}")
    state = {j.name: j for j in jobs}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs_at_once) as pool:
        running: dict[Future, Job] = {}
        while pending or running:
            for job in list(pending):
                before = state[job.after] if job.after else None
                if before is not None and before.state == "failed":
                    job.state = "failed"
                    pending.remove(job)
                    console.print(f"  [red]not run[/] {job.name}: {before.name} failed")
                elif (before is None or before.state in ("done", "skipped")) and len(running) < jobs_at_once:
                    job.state = "running"
                    pending.remove(job)
                    running[pool.submit(_timed, launch, job, env)] = job
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                code, job.seconds = future.result()
                job.state = "done" if code == 0 else "failed"
                mark = "[green]done[/]" if code == 0 else f"[red]failed (exit {code})[/]"
                console.print(f"  {mark} {job.name} in {job.seconds:.0f} s; log: {job.log}")
    failed = [j for j in jobs if j.state == "failed"]
    wall = time.perf_counter() - started
    rows = collect(ablation, console)
    done = sum(j.state == "done" for j in jobs)
    console.print(f"ablation finished in {wall:.0f} s ({done} runs done, {skipped} skipped, {len(failed)} failed); "
                  f"results in {ablation.root}")
    if failed:
        tails = "\n".join(f"- {j.name}: see {j.log}" for j in failed)
        raise UserError(f"{len(failed)} run(s) of the ablation failed:\n{tails}\nFix the cause and run the same "
                        f"command again: finished runs are skipped, interrupted ones resume.")
    return {"jobs": [(j.name, j.state, round(j.seconds, 1)) for j in jobs], "table": rows, "wall_s": wall}


def _timed(launch: Callable[[Job, dict[str, str]], int], job: Job, env: dict[str, str]) -> tuple[int, float]:
    started = time.perf_counter()
    return launch(job, env), time.perf_counter() - started


def _launch(job: Job, env: dict[str, str]) -> int:
    """``python -m rlhfkit run RECIPE`` in a fresh process, its output to ``job.log``."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} rlhfkit run {job.recipe_file}\n")
        log.flush()
        process = subprocess.run([sys.executable, "-m", "rlhfkit", "run", str(job.recipe_file)],
                                 stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, check=False)
    return process.returncode


# ------------------------------------------------------------------ results


def collect(ablation: Ablation, console: Console) -> list[dict[str, Any]]:
    """Write metrics.csv, table.csv/.md and the plots from whatever runs are finished."""
    root = ablation.root
    variants = list(ablation.spec.variants)
    long_rows: list[tuple[str, int, str, int, str, float]] = []
    finals: dict[str, list[dict[str, Any]]] = defaultdict(list)
    curves: dict[str, dict[str, dict[int, dict[int, float]]]] = defaultdict(lambda: defaultdict(dict))
    for variant in variants:
        compared = ablation.stage_of(variant)
        for seed in ablation.seeds:
            run_dir = ablation.recipes[(variant, seed)].run_dir
            summaries = {}  # finished stages
            for stage in ablation.recipes[(variant, seed)].stages:
                for step, metric, value in _read_metrics(run_dir / stage.name / "metrics.csv"):
                    long_rows.append((variant, seed, stage.name, step, metric, value))
                    if stage.name == compared:
                        curves[metric][variant].setdefault(seed, {})[step] = value
                info, _ = read_json_file(run_dir / stage.name / DONE_NAME, ("summary",))
                if info is not None:
                    summaries[stage.name] = info["summary"]
            if compared in summaries:  # wall time: the variant's own stages, not the shared ones
                own = sum(summary.get("wall_time_s", 0) for name, summary in summaries.items()
                          if name not in ablation.shared[seed])
                finals[variant].append({**summaries[compared], "wall_time_s": own})
    with open(_fresh(root / "metrics.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "stage", "step", "metric", "value"])
        writer.writerows(long_rows)
    keys = ablation.spec.table or _numeric_keys(finals)
    if "wall_time_s" not in keys:
        keys = [*keys, "wall_time_s"]
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"variant": variant, "seeds": len(finals[variant])}
        for key in keys:
            values = [f[key] for f in finals[variant] if isinstance(f.get(key), int | float)]
            row[key] = (mean_std(values) if values else None)
        rows.append(row)
    _write_table(root, ablation, keys, rows, console)
    plots = ablation.spec.plots or sorted(m for m in curves if m.startswith("eval/"))
    _plot(root / "plots", plots, curves, variants)
    _bars(root / "plots", keys, rows)
    return rows


def _fresh(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _read_metrics(path: Path) -> list[tuple[int, str, float]]:
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.pop("step")))
            out += [(step, k, float(v)) for k, v in row.items() if v not in ("", None)]
    return out


def _numeric_keys(finals: dict[str, list[dict[str, Any]]]) -> list[str]:
    keys: list[str] = []
    for summaries in finals.values():
        for summary in summaries:
            keys += [k for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
                     and "/" not in k and k not in keys]
    return keys


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(value: tuple[float, float] | None, seeds: int) -> str:
    if value is None:
        return "—"
    mean, std = value
    return f"{mean:.3g}±{std:.2g}" if seeds > 1 else f"{mean:.3g}"


def _write_table(root: Path, ablation: Ablation, keys: list[str], rows: list[dict[str, Any]], console: Console) -> None:
    seeds = len(ablation.seeds)
    title = (f"{ablation.path.name}: final metrics, mean ± std over {seeds} seeds (sample std)" if seeds > 1
             else f"{ablation.path.name}: final metrics (1 seed)")
    table = Table(title=title)
    table.add_column("variant")
    for key in keys:
        table.add_column(key, justify="right")
    cells = [[row["variant"], *(_cell(row[k], row["seeds"]) for k in keys)] for row in rows]
    for cell_row in cells:
        table.add_row(*cell_row)
    # wide enough for full metric names and values: a terminal narrower than that scrolls
    widths = [max(len(text) for text in column) for column in zip(["variant", *keys], *cells, strict=True)]
    console.print(table, width=max(console.width, sum(widths) + 3 * len(widths) + 1))
    with open(_fresh(root / "table.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seeds", *[f"{k}_{part}" for k in keys for part in ("mean", "std")]])
        for row in rows:
            writer.writerow([row["variant"], row["seeds"],
                             *[x for k in keys for x in (row[k] if row[k] is not None else ("", ""))]])
    docs = {n: v.doc for n, v in ablation.spec.variants.items()}
    lines = [f"| variant | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {row['variant']} | {' | '.join(_cell(row[k], row['seeds']) for k in keys)} |" for row in rows]
    if any(docs.values()):
        lines += ["", *[f"- **{n}**: {d}" for n, d in docs.items() if d]]
    atomic_write_text(root / "table.md", "\n".join(lines) + "\n")


def _plot(directory: Path, metrics: list[str], curves: dict, variants: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for metric in metrics:
        if metric not in curves:
            continue
        figure, axis = plt.subplots(figsize=(8.0, 4.0))
        colours = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20").colors
        for index, variant in enumerate(variants):
            runs = curves[metric].get(variant)
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(r) for r in runs.values())))
            if not steps:
                continue
            stats = [mean_std([r[s] for r in runs.values()]) for s in steps]
            means = [m for m, _ in stats]
            colour = colours[index % len(colours)]
            axis.plot(steps, means, label=variant, color=colour)
            if len(runs) > 1:
                axis.fill_between(steps, [m - s for m, s in stats], [m + s for m, s in stats],
                                  color=colour, alpha=0.15, linewidth=0)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} (mean ± std over seeds)")
        axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        figure.tight_layout()
        figure.savefig(directory / (metric.replace("/", "_") + ".png"), dpi=100)
        plt.close(figure)


def _bars(directory: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    """One bar chart per table metric: the mean per variant, the sample std as error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for key in keys:
        present = [r for r in rows if r.get(key) is not None]
        if not present:
            continue
        figure, axis = plt.subplots(figsize=(max(4.0, 0.8 * len(present) + 1.5), 3.6))
        axis.bar(range(len(present)), [r[key][0] for r in present], yerr=[r[key][1] for r in present],
                 capsize=3, color="tab:blue", alpha=0.8)
        axis.set_xticks(range(len(present)), [r["variant"] for r in present], rotation=30, ha="right")
        axis.set_ylabel(key)
        axis.set_title(f"final {key} (mean ± std over seeds)")
        figure.tight_layout()
        figure.savefig(directory / f"final_{key.replace('/', '_')}.png", dpi=100)
        plt.close(figure)
