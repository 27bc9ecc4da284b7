"""Imports point one way, module by module, and none hides inside a function.

    pallas_kernels -> twilight_jax core -> models -> twilight_jax runtime -> scripts

Every module of pallas_kernels/, twilight_jax/, models/ and scripts/ is parsed (ast) and each of
its imports of a project module is checked: the imported module's layer must not be above the
importer's, and the import must sit at module level (a function-level import hides a dependency
from the reader and from this test). Third-party imports may be lazy (tqdm, gguf, torch, ...).
Python runs a package's ``__init__`` before any of its modules, so importing the core also runs
the ``twilight_jax`` facade; that is the interpreter's doing, not an import the code writes, and
it is not counted. Tests are no layer and are not checked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pallas_kernels", "twilight_jax", "models")
SCRIPTS = REPO / "scripts"

KERNELS, CORE, MODELS, RUNTIME, ENTRY = range(5)
LAYER_NAMES = ("pallas_kernels", "twilight_jax core", "models", "twilight_jax runtime", "scripts")
CORE_MODULES = ("config", "cache", "selectors", "pruner", "attention", "reference", "sharding")


def layer_of(module: str) -> int:
    """The layer of a project module (dotted name; scripts by their file stem)."""
    top, _, rest = module.partition(".")
    if top == "pallas_kernels":
        return KERNELS
    if top == "models":
        return MODELS
    if top == "twilight_jax":
        first = rest.split(".", 1)[0]
        if first in CORE_MODULES:
            return CORE
        # The facade (it imports the runtime's generate), the runtime, and the forwarding
        # entry module of ``python -m twilight_jax.serve``.
        if first in ("", "runtime", "serve"):
            return RUNTIME
        raise AssertionError(f"twilight_jax.{first} is in no layer: add it to this test")
    return ENTRY


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module the layers cover (scripts by their stem)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    for path in sorted(SCRIPTS.glob("*.py")):
        out[path.stem] = path
    return out


def _imported(node, module: str, is_package: bool, known) -> list[str]:
    """The project modules one import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        # `from pkg import sub` names the submodule when there is one, else pkg itself.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return [n for n in names if n.split(".")[0] in PACKAGES or n in known]


def _dynamic_import(node) -> str | None:
    """The literal module name of an importlib.import_module / __import__ call, if any."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    arg = node.args[0]
    if name in ("import_module", "__import__") and isinstance(arg, ast.Constant):
        return arg.value if isinstance(arg.value, str) else None
    return None


def violations(module: str, source: str, known, is_package: bool = False) -> list[str]:
    """Upward and function-level project imports of one module, one line each."""
    tree = ast.parse(source)
    out = []
    here = layer_of(module)

    def visit(node, in_function: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        targets = []
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = _imported(node, module, is_package, known)
        dynamic = _dynamic_import(node)
        if dynamic is not None and (dynamic.split(".")[0] in PACKAGES or dynamic in known):
            targets = [dynamic]
            out.append(f"{module}:{node.lineno} imports {dynamic} through a call")
        for target in targets:
            if in_function:
                out.append(f"{module}:{node.lineno} imports {target} inside a function")
            there = layer_of(target)
            if there > here:
                out.append(
                    f"{module}:{node.lineno} imports {target}: {LAYER_NAMES[here]} must not "
                    f"import {LAYER_NAMES[there]}"
                )
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return out


def test_every_project_module_imports_downward_at_module_level():
    known = project_modules()
    found = []
    for module, path in known.items():
        source = path.read_text(encoding="utf-8")
        found += violations(module, source, known, is_package=path.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("twilight_jax.cache", "import models\n", "twilight_jax core must not import models"),
        (
            "twilight_jax.pruner",
            "from twilight_jax import generate\n",
            "must not import twilight_jax runtime",
        ),
        ("models.llama", "from twilight_jax import SparsityConfig\n", "must not import"),
        ("models.llama", "from twilight_jax.runtime import generate\n", "must not import"),
        ("pallas_kernels.topp", "from twilight_jax.config import X\n", "must not import"),
        (
            "twilight_jax.runtime.generate",
            "def f():\n    from twilight_jax.runtime import sampling\n",
            "inside a function",
        ),
        ("models.loaders", "def f():\n    import twilight_jax.sharding\n", "inside a function"),
        ("bench_x", "def f():\n    import benchlib\n", "inside a function"),
        ("models.tiny", "import importlib\nimportlib.import_module('models.llama')\n", "call"),
    ],
)
def test_the_check_catches_what_it_guards(module, source, expected):
    known = project_modules()
    found = violations(module, source, known)
    assert any(expected in line for line in found), found


def test_allowed_imports_pass_the_check():
    known = project_modules()
    ok = [
        ("twilight_jax.attention", "from twilight_jax import pruner, selectors\n"),
        ("models.llama", "from twilight_jax.attention import decode_attention\n"),
        ("twilight_jax.runtime.serve", "import models\nfrom models.tiny import TINY_RANDOM\n"),
        ("models.loaders", "def f():\n    from tqdm.auto import tqdm\n"),
        ("bench_x", "import benchlib\nfrom twilight_jax import generate\n"),
    ]
    for module, source in ok:
        assert violations(module, source, known) == [], (module, source)


def test_the_package_loads_without_models_and_either_goes_first():
    # The facade's generate must not pull in models: models imports the core, so a model
    # import inside the runtime's generate would be a cycle whichever package loads first.
    code = (
        "import sys, twilight_jax; assert 'models' not in sys.modules, 'models loaded';"
        "import models"
    )
    for program in (code, "import models, twilight_jax.runtime.serve"):
        cmd = [sys.executable, "-c", program]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
