"""The folder's shape: what sits at the root, which folder may import which, who reads the whole config, the loop.

Fails when a module imports upward (a folder module importing a root module) or against the layer order, when
a builder takes the whole config, when a training loop grows past one screen, or when a checkpoint file name
is spelled outside the module that owns the format. The rules are the README's file map.
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest
from conftest import RECIPE_DIR

# What users run or import by name (the upstream recipe's module names among them); everything else is in a folder.
ROOT_MODULES = {
    *("train_ddp", "train_fsdp2", "train_fsdp2_cp", "evaluate", "score", "generate"),  # what users run
    *("modeling_llama_te", "convert", "dataset", "collator", "checkpoint", "scheduler", "perf_logger"),  # upstream's
    "distributed_config",
}
# Each folder and the folders it may import (the layers, bottom first); root modules may import any folder.
LAYERS = {
    "runtime": set(),
    "model": {"runtime"},
    "data": {"runtime"},
    "config": {"runtime", "model", "data"},
    "checkpointing": {"runtime", "model", "data"},
    "training": {"runtime", "model", "data", "checkpointing"},
    "use": {"runtime", "model", "data", "checkpointing"},
}
ENTRYPOINTS = ("train_ddp.py", "train_fsdp2.py", "train_fsdp2_cp.py")
# The only code that takes the whole config: the entrypoints, config/ (checks, command line, options), the run record.
WHOLE_CONFIG_READERS = {*ENTRYPOINTS, "config/checks.py", "config/command_line.py", "config/options.py"}
WHOLE_CONFIG_READERS.add("checkpointing/run_record.py")


def recipe_modules() -> list[Path]:
    """Every module of the recipe: the root's and the folders' (not tests, scripts or benchmarks)."""
    files = sorted(RECIPE_DIR.glob("*.py"))
    for folder in LAYERS:
        files += sorted((RECIPE_DIR / folder).glob("*.py"))
    return files


def imported_recipe_modules(path: Path) -> set[str]:
    """The recipe modules `path` imports (dotted names: `data.batches`, `perf_logger`), anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from checkpointing import format`
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    recipe = {p.stem for p in RECIPE_DIR.glob("*.py")} | set(LAYERS)
    modules = {n for n in names if n.split(".")[0] in recipe}
    return {n for n in modules if "." not in n or (RECIPE_DIR / (n.replace(".", "/") + ".py")).exists()}


def test_the_root_holds_what_users_run_or_import_by_name():
    assert {p.stem for p in RECIPE_DIR.glob("*.py")} == ROOT_MODULES
    for folder in LAYERS:  # each folder says what it holds and what it may import
        doc = ast.get_docstring(ast.parse((RECIPE_DIR / folder / "__init__.py").read_text()))
        assert doc and ("imports nothing" in doc or "May import" in doc), folder


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_folders_import_only_the_layers_below_them(folder):
    wrong = {}
    for path in sorted((RECIPE_DIR / folder).glob("*.py")):
        for module in imported_recipe_modules(path):
            top = module.split(".")[0]
            if top != folder and top not in LAYERS[folder]:  # a root module, or a folder not below this one
                wrong.setdefault(path.name, []).append(module)
    assert wrong == {}, f"{folder}/ may import only {sorted(LAYERS[folder])}"


def test_no_import_cycles():
    graph = {}
    for path in recipe_modules():
        name = ".".join(path.relative_to(RECIPE_DIR).with_suffix("").parts)
        graph[name] = {m for m in imported_recipe_modules(path) if m != name and not m.endswith("__init__")}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join([*trail, node])}"
        state[node] = "open"
        for child in graph.get(node, ()):
            visit(child, [*trail, node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_only_config_code_and_the_run_record_take_the_whole_config():
    """A builder takes its own group (`checkpoint_cfg`, `adamw_kwargs`, ...) or options, never `cfg`."""
    takers = set()
    for path in recipe_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if function and any(arg.arg == "cfg" for arg in [*node.args.args, *node.args.kwonlyargs]):
                takers.add(path.relative_to(RECIPE_DIR).as_posix())
    assert takers <= WHOLE_CONFIG_READERS, sorted(takers - WHOLE_CONFIG_READERS)


def training_loop(script: str) -> ast.While:
    (loop,) = [n for n in ast.walk(ast.parse((RECIPE_DIR / script).read_text())) if isinstance(n, ast.While)]
    return loop


def depth(node: ast.AST) -> int:
    """Nesting of compound statements, the node itself counting 1."""
    blocks = (ast.For, ast.While, ast.If, ast.With, ast.Try)
    inner = [depth(child) for child in ast.iter_child_nodes(node)]
    return (1 if isinstance(node, blocks) else 0) + max(inner, default=0)


@pytest.mark.parametrize("script", ENTRYPOINTS)
def test_the_training_loop_fits_one_screen(script):
    loop = training_loop(script)
    assert loop.end_lineno - loop.lineno + 1 <= 40
    assert depth(loop) <= 3


def test_the_loops_differ_only_in_the_gradient_sync_switch():
    ddp, fsdp2, cp = (
        ast.get_source_segment((RECIPE_DIR / s).read_text(), training_loop(s)).splitlines() for s in ENTRYPOINTS
    )
    assert cp == fsdp2
    differing = [(a, b) for a, b in zip(fsdp2, ddp) if a != b]
    assert len(fsdp2) == len(ddp) and len(differing) == 1 and "set_requires_gradient_sync" in differing[0][0]


def test_checkpoint_file_names_are_spelled_in_one_module():
    owners = dict.fromkeys(
        ['"model_optimizer.pt"', '"COMPLETE"', '"dcp"', "rank_{rank}.pt"], "checkpointing/format.py"
    )
    owners.update({'"run_info.yaml"': "checkpointing/run_record.py", '"metrics.jsonl"': "perf_logger.py"})
    for literal, owner in owners.items():
        spelled = {p.relative_to(RECIPE_DIR).as_posix() for p in recipe_modules() if literal in p.read_text()}
        assert spelled == {owner}, literal


def test_the_readme_file_map_states_the_loop_and_the_diffs_as_they_are():
    """The counts the README gives for `diff train_fsdp2.py train_ddp.py` (and _cp) and the loop are the real ones."""
    readme = (RECIPE_DIR / "README.md").read_text()
    loop = training_loop("train_fsdp2.py")
    assert f"one loop ({loop.end_lineno - loop.lineno + 1} lines)" in readme
    for other, phrase in (("train_ddp.py", "only strategy lines ({} changed lines"), ("train_fsdp2_cp.py", "({})")):
        diff = subprocess.run(["diff", "train_fsdp2.py", other], cwd=RECIPE_DIR, capture_output=True, text=True)
        changed = sum(line[:1] in "<>" for line in diff.stdout.splitlines())
        assert phrase.format(changed) in readme, (other, changed)


def test_the_gpu_job_runs_every_file_that_holds_gpu_tests():
    """scripts/gpu_jobs/gpu_tests.sh names its files (three processes side by side): a new one must join."""
    job = (RECIPE_DIR / "scripts" / "gpu_jobs" / "gpu_tests.sh").read_text()
    gpu = re.compile(r"^(@pytest\.mark\.gpu|pytestmark = .*\bgpu\b)", re.MULTILINE)
    marked = {p.name for p in (RECIPE_DIR / "tests").glob("test_*.py") if gpu.search(p.read_text())}
    assert marked and {name for name in marked if f"tests/{name}" not in job} == set()


@pytest.mark.parametrize("script", sorted(p.name for p in (RECIPE_DIR / "scripts" / "gpu_jobs").glob("*.sh")))
def test_gpu_job_scripts_parse(script):
    """The device-call wrappers run only on a lent GPU: at least their syntax is checked here."""
    path = RECIPE_DIR / "scripts" / "gpu_jobs" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True).returncode == 0
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
