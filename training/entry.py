"""The console scripts of the training side, usable on a runtime-only install.

`pip install .` installs what star-chat needs (numpy, onnxruntime, rich) and all four packages'
code, so star-train, star-eval, star-judge, star-analyze and star-export are on PATH there too.
Their work needs the `train` extra (torch, transformers, httpx, ...). Each script first checks, without importing
anything heavy, that the extra's modules can be found; if not, it prints

    star-train: needs the training extras: pip install 'star-esc[train]' (missing: torch, ...)

and exits 2 (star_runtime.cli: the user can fix it); `--version` still answers. Only then is
the command's own module imported and its `main` run.

Why one distribution with guarded commands rather than a runtime-only distribution of its own:
one version number and one wheel for the runtime and the tools that write its bundles, one
`pip install .` in the README, and the bundle format's writer and reader released together; the
cost is five commands on a runtime-only PATH that can only say what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

from star_runtime.cli import EXIT_USAGE, version

# Import names of the `train` extra (pyproject.toml) that the commands import; the two that can
# ask an LLM (star-eval --responder openai, star-judge) need its HTTP client as well.
TRAIN_MODULES = ("torch", "transformers", "safetensors", "nltk", "sklearn", "matplotlib", "onnx")
LLM_MODULES = (*TRAIN_MODULES, "httpx")
NEEDS_EXTRAS = "needs the training extras: pip install 'star-esc[train]'"


def missing_modules(names: tuple[str, ...] = TRAIN_MODULES) -> list[str]:
    """The modules of `names` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        if name in sys.modules:
            if sys.modules[name] is None:  # an import of it was blocked
                missing.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def run(prog: str, module: str, argv: list[str] | None = None, needs: tuple[str, ...] = TRAIN_MODULES) -> int:
    """`module.main(argv)` if the modules `needs` (of the training extras) are installed, else one
    line and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    missing = missing_modules(needs)
    if missing:
        if args == ["--version"]:
            print(f"{prog} {version()}")
            return 0
        print(f"{prog}: {NEEDS_EXTRAS} (missing: {', '.join(missing)})", file=sys.stderr)
        return EXIT_USAGE
    main: Callable[[list[str] | None], int] = importlib.import_module(module).main
    return main(argv)


def star_train() -> int:
    return run("star-train", "star_training.train_cli")


def star_eval() -> int:
    return run("star-eval", "star_training.eval_cli", needs=LLM_MODULES)


def star_judge() -> int:
    return run("star-judge", "star_training.judge_cli", needs=LLM_MODULES)


def star_analyze() -> int:
    return run("star-analyze", "star_training.analyze_cli")


def star_export() -> int:
    return run("star-export", "star_export.cli")
