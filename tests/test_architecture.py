"""The house's rules, read statically from the source (AST only: nothing of vidray, Ray or torch is imported).

- Stage order: a module never imports (at any level, function bodies included) a module of a later
  stage: shared < data < model < train < pretrain < tune < infer < report < cli. vidray.testing is for
  tests only; production code may reach it through one env-gated dynamic import (a hook a test turns on).
- No import circle among vidray modules (module-level imports).
- No module over MAX_LINES lines.
- Imports of vidray modules inside functions only where this file says why (FUNCTION_IMPORTS_ALLOWED).
- No vidray class named like a public Ray Train/Tune/Data class (they are used side by side).
- ``ls vidray`` shows the pipeline: the stage folders (each a package), the shared modules, the CLI.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vidray"

STAGE_ORDER = ("shared", "data", "model", "train", "pretrain", "tune", "infer", "report", "cli")
STAGE_FOLDERS = ("data", "model", "train", "pretrain", "tune", "infer", "report")
TESTING = "vidray.testing"
SHARED_MODULES = ("__init__", "config", "errors", "storage", "folder_lock", "cluster", "local_cluster", "figures", "compat")
TOP_MODULES = ("cli", "__main__")
# Package data, not code: the embedded default config (vidray.config.DEFAULT_CONFIG, pyproject's package-data).
DATA_FOLDERS = ("configs",)
MAX_LINES = 450

# Where a function may import a vidray module, and why. Keys: (module, function) or (module, "*") for
# every function of the module; values: the reason. Anything else is imported at module level.
FUNCTION_IMPORTS_ALLOWED = {
    ("vidray.cli", "*"): "each subcommand imports its stage when it runs, so `vidray --help` and a "
    "subcommand's argument errors do not wait for torch and Ray to import",
    ("vidray.data.preprocess", "preprocess"): "Ray (seconds to import) only when shards remain to decode: "
    "a finished dataset is reported, and vidray.data.prepare and the index/report commands stay Ray-free",
    ("vidray.data.video", "probe"): "probing goes through PyAV, an optional decoding library",
    ("vidray.data.decode.torchcodec", "read_samples"): "a file torchcodec refuses is probed with PyAV for the "
    "typed reason, on that error path only: PyAV is optional like every decoding library",
    ("vidray.infer.batch_predict", "__init__"): "the model actor loads torch and transformers; the driver "
    "that plans chunks and writes parts does not (about 4 s of its start on 2 cores, docs/benchmarks.md)",
    ("vidray.infer.batch_predict", "_isolate_crashes"): "the same, on the path that re-runs the videos of a "
    "crashed decode task in the driver",
    ("vidray.tune.callbacks", "wandb_callbacks"): "Ray's W&B integration imports wandb (seconds) and the module "
    "is unpickled by every trial's Ray Train controller: only a sweep that logs to W&B imports it",
}
# read_clip (wherever vidray.data defines it) imports the decoder named by data.decoder when it is asked
# for: each decoding library is optional (PyAV, decord, torchcodec), so importing the others would fail.
OPTIONAL_DECODERS_FUNCTION, OPTIONAL_DECODERS_PACKAGE = "read_clip", "vidray.data.decode"
# The one production import of vidray.testing allowed: a dynamic one (importlib.import_module), guarded by
# the environment a test sets (e.g. the worker loop loading vidray.testing.faults when its variables are
# set), so a run that no test configured never loads test code.
TESTING_HOOKS_ALLOWED = 1
# Other trees whose code may not import vidray.testing either (only tests/ may).
NON_TEST_TREES = ("vidray", "jobs", "benchmarks")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported vidray module
    line: int
    function: str | None  # innermost enclosing function, None at module level (class bodies count as module level)
    type_checking: bool  # under `if TYPE_CHECKING:` (never runs)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def vidray_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = vidray_modules()


def resolve(name: str) -> str | None:
    """The vidray module ``name`` (dotted) refers to: itself, or its longest prefix that is a module."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.imports: list[Import] = []
        self.functions: list[str] = []
        self.type_checking = 0

    def _add(self, target: str, line: int) -> None:
        function = self.functions[-1] if self.functions else None
        self.imports.append(Import(self.module, target, line, function, self.type_checking > 0))

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        if _is_type_checking(node.test):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] == "vidray" and (target := resolve(alias.name)):
                self._add(target, node.lineno)

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        if base.split(".")[0] != "vidray":
            return
        targets = {resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else resolve(base)
                   for alias in node.names}  # fmt: skip
        for target in sorted(filter(None, targets)):
            self._add(target, node.lineno)


def imports_of(path: Path) -> list[Import]:
    collector = _ImportCollector(module_name(path), path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(), str(path)))
    return collector.imports


ALL_IMPORTS = [imp for path in MODULES.values() for imp in imports_of(path)]


def stage_of(module: str) -> str:
    parts = module.split(".")
    if module == "vidray" or (len(parts) == 2 and parts[1] in SHARED_MODULES):
        return "shared"
    if len(parts) == 2 and parts[1] in TOP_MODULES:
        return "cli"
    if parts[1] in STAGE_FOLDERS:
        return parts[1]
    if module == TESTING or module.startswith(TESTING + "."):
        return "testing"
    raise AssertionError(f"{module} is in no stage: put it in a stage folder, or list it as shared in this test")


def test_every_module_has_a_stage():
    unplaced = []
    for module in MODULES:
        try:
            stage_of(module)
        except AssertionError as error:
            unplaced.append(str(error))
    assert not unplaced, "\n".join(unplaced)


def test_a_lower_stage_never_imports_a_higher_one():
    rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    upward = []
    for imp in ALL_IMPORTS:
        source, target = stage_of(imp.source), stage_of(imp.target)
        if "testing" in (source, target):
            continue  # test_production_code_never_imports_vidray_testing
        if rank[target] > rank[source]:
            where = f"in {imp.function}()" if imp.function else "at module level"
            upward.append(f"{imp.source} ({source}) imports {imp.target} ({target}) {where}, line {imp.line}")
    assert not upward, "a lower stage imports a higher one:\n" + "\n".join(sorted(upward))


def _dynamic_imports(tree: ast.AST):
    """(call, scope) for importlib.import_module / __import__ calls; scope: the enclosing function, or at
    module level the innermost enclosing ``if`` (the call itself when there is none), where a guard reads."""

    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child
            elif isinstance(child, ast.If) and not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.test
            else:
                inner = scope
            if isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in ("import_module", "__import__"):
                    yield child, scope if isinstance(scope, ast.AST) else child
            yield from walk(child, inner)

    yield from walk(tree, None)


def _reads_environment(scope: ast.AST) -> bool:
    return any(
        (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"))
        or (isinstance(node, ast.Name) and node.id in ("environ", "getenv"))
        for node in ast.walk(scope)
    )


def test_production_code_never_imports_vidray_testing():
    static = []
    for tree_name in NON_TEST_TREES:
        for path in sorted((REPO / tree_name).rglob("*.py")):
            if tree_name == "vidray" and stage_of(module_name(path)) == "testing":
                continue
            collector = _ImportCollector(module_name(path), path.name == "__init__.py")
            collector.visit(ast.parse(path.read_text(), str(path)))
            for imp in collector.imports:
                if stage_of(imp.target) == "testing":
                    static.append(f"{path.relative_to(REPO)}:{imp.line} imports {imp.target}")
    assert not static, "only tests import vidray.testing (production code loads it through an env-gated hook):\n" + (
        "\n".join(static)
    )


def test_dynamic_imports_are_only_the_env_gated_testing_hook():
    hooks, hidden = [], []
    for module, path in MODULES.items():
        if stage_of(module) == "testing":
            continue
        for call, scope in _dynamic_imports(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            argument = call.args[0] if call.args else None
            literal = argument.value if isinstance(argument, ast.Constant) and isinstance(argument.value, str) else None
            if literal is not None and literal.split(".")[0] != "vidray":
                continue  # a third-party optional library, not a hidden edge of vidray's graph
            if literal is not None and not literal.startswith(TESTING):
                hidden.append(f"{where} imports {literal} dynamically: import it by name")
            elif not _reads_environment(scope):
                hidden.append(f"{where}: a testing hook must be guarded by the environment a test sets")
            else:
                hooks.append(where)
    assert not hidden, "\n".join(hidden)
    assert len(hooks) <= TESTING_HOOKS_ALLOWED, f"more than {TESTING_HOOKS_ALLOWED} testing hook: {hooks}"


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_circles():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in ALL_IMPORTS:
        if imp.function is None and not imp.type_checking and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    circles = _circles(graph)
    assert not circles, "import circles among vidray modules:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_no_module_over_the_size_limit():
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split by concern): " + ", ".join(
        f"{module} ({n})" for module, n in sorted(long.items(), key=lambda item: -item[1])
    )


def _function_import_allowed(imp: Import) -> bool:
    if (imp.source, "*") in FUNCTION_IMPORTS_ALLOWED or (imp.source, imp.function) in FUNCTION_IMPORTS_ALLOWED:
        return True
    return (
        imp.function == OPTIONAL_DECODERS_FUNCTION
        and stage_of(imp.source) == "data"
        and imp.target.startswith(OPTIONAL_DECODERS_PACKAGE + ".")
    )


def test_vidray_imports_inside_functions_only_where_allowed():
    hidden: dict[str, list[str]] = {}
    for imp in ALL_IMPORTS:
        if imp.function is not None and not _function_import_allowed(imp):
            hidden.setdefault(imp.source, []).append(f"{imp.function}:{imp.line} {imp.target}")
    count = sum(map(len, hidden.values()))
    listing = "\n".join(f"{module}: {', '.join(places)}" for module, places in sorted(hidden.items()))
    assert not hidden, f"{count} vidray imports inside functions (move them to module level):\n{listing}"


def _public_names(ray_root: Path, module: str) -> set[str]:
    """The strings in ``__all__`` of an installed Ray module, read from its source (Ray is not imported)."""
    path = ray_root.joinpath(*module.split(".")[1:], "__init__.py")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets, value = [node.target], node.value
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            names |= {c.value for c in ast.walk(value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return names


RAY_PUBLIC_MODULES = ("ray.train", "ray.train.torch", "ray.tune", "ray.data")


def test_no_vidray_class_is_named_like_a_ray_class():
    spec = importlib.util.find_spec("ray")  # finds the installed package without importing it
    assert spec is not None and spec.submodule_search_locations, "Ray is not installed"
    ray_root = Path(next(iter(spec.submodule_search_locations)))
    ray_names = {}
    for module in RAY_PUBLIC_MODULES:
        for name in _public_names(ray_root, module):
            if name[:1].isupper():
                ray_names.setdefault(name, module)
    expected = {"RunConfig", "TuneConfig", "DataConfig", "ScalingConfig", "CheckpointConfig", "Checkpoint", "Result"}
    assert expected <= set(ray_names), "Ray's public names moved: fix _public_names"
    clashes = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name in ray_names:
                ray_class = f"{ray_names[node.name]}.{node.name}"
                clashes.append(f"{module}.{node.name} (line {node.lineno}) is named like {ray_class}")
    assert not clashes, "rename these (they are used beside Ray's classes):\n" + "\n".join(clashes)


def test_ls_vidray_shows_the_pipeline():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    expected = (
        set(STAGE_FOLDERS) | {"testing"} | {f"{m}.py" for m in SHARED_MODULES + TOP_MODULES} | set(DATA_FOLDERS)
    )
    unexpected, missing = sorted(entries - expected), sorted(expected - entries)
    assert entries == expected, f"unexpected in vidray/: {unexpected}; missing: {missing}"
    # Every stage folder is a package: pyproject's packages.find skips folders without __init__.py.
    folders = (*STAGE_FOLDERS, "testing")
    not_packages = [f"vidray/{folder}" for folder in folders if not (PACKAGE / folder / "__init__.py").is_file()]
    assert not not_packages, f"no __init__.py (an installed vidray would lack them): {not_packages}"


def test_the_modules_docs_design_names_are_where_it_says():
    """docs/design.md's tables name the module of each stage and on-disk contract: they exist there."""
    text = (REPO / "docs" / "design.md").read_text()
    named = set()
    for match in re.finditer(r"vidray/[\w/]*(?:\{[\w,]+\})?[\w/]*\.py", text):
        path = match.group(0)
        if "{" in path:
            head, rest = path.split("{", 1)
            choices, tail = rest.split("}", 1)
            named |= {f"{head}{choice}{tail}" for choice in choices.split(",")}
        else:
            named.add(path)
    assert named, "docs/design.md names no vidray module"
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert not missing, f"docs/design.md names modules that are not there: {missing}"
