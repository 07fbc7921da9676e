"""Install shapes, versions and the commands' edges: what a newcomer's first minutes run into.

A runtime-only install is emulated in the default suite by blocking the training extras' imports
(`sys.modules[name] = None`, which makes `import torch` fail as it does without torch); the slow
test builds the real thing: a venv with `pip install <copy of the checkout>` and no extras.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMANDS = {"star-chat": "star_runtime.chat", "star-serve": "star_runtime.serve.cli", "star-train": "star_training.train_cli",
            "star-eval": "star_training.eval_cli", "star-judge": "star_training.judge_cli",
            "star-analyze": "star_training.analyze_cli",
            "star-export": "star_export.cli"}
BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def python(code: str, cwd: Path, timeout: int = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STAR_BUNDLE"}
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin)


# -- versions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prog", list(COMMANDS))
def test_every_command_answers_version(prog, tmp_path) -> None:
    done = python(f"import sys; sys.argv = [{prog!r}, '--version']; import runpy; "
                  f"runpy.run_module({COMMANDS[prog]!r}, run_name='__main__')", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{prog} {metadata.version('star-esc')}"


def test_console_scripts_are_the_guarded_entry_points() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["star-chat"] == "star_runtime.chat:main"
    assert scripts["star-serve"] == "star_runtime.serve.cli:main"
    for prog in ("star-train", "star-eval", "star-judge", "star-analyze", "star-export"):
        module, func = scripts[prog].split(":")
        assert module == "star_training.entry"
        __import__(module)
        assert callable(getattr(sys.modules[module], func))


# -- a runtime-only install ---------------------------------------------------------------------------
@pytest.mark.parametrize("prog", ["star-train", "star-eval", "star-judge", "star-analyze", "star-export"])
def test_training_commands_without_the_extras_say_what_to_install(prog, tmp_path) -> None:
    from star_training.entry import TRAIN_MODULES

    func = prog.replace("-", "_")
    prelude = BLOCK.format(names=TRAIN_MODULES)
    for args, code, stream in ((["--help"], 2, "stderr"), (["--version"], 0, "stdout")):
        done = python(prelude + f"sys.argv = [{prog!r}, *{args!r}]\n"
                      f"from star_training.entry import {func}\nsys.exit({func}())", tmp_path)
        assert done.returncode == code, done.stderr
        if code == 2:
            assert done.stderr == (f"{prog}: needs the training extras: pip install 'star-esc[train]' "
                                   f"(missing: {', '.join(TRAIN_MODULES)})\n")
        else:
            assert getattr(done, stream).strip() == f"{prog} {metadata.version('star-esc')}"


def test_star_chat_runs_without_the_training_extras(tmp_path) -> None:
    from star_training.entry import TRAIN_MODULES

    done = python(BLOCK.format(names=TRAIN_MODULES) + "from star_runtime.chat import main\nsys.exit(main([]))\n",
                  tmp_path, stdin="hello\n")
    assert done.returncode == 0 and '"reply"' in done.stdout, done.stderr


# -- README --------------------------------------------------------------------------------------------
def test_readme_starts_with_the_two_setup_commands() -> None:
    first = code_blocks("bash")[0].strip().splitlines()
    assert first == ["pip install . && star-chat",
                     'pip install -e ".[train,triton,test]" torch==2.13.0 && python -m pytest -q']
    ci = (REPO / ".ci" / "run").read_text() if (REPO / ".ci" / "run").is_file() else first[1]
    assert "python -m pytest -q" in ci


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_readme_python_examples_run_as_written_without_the_training_extras(index, tmp_path) -> None:
    """Each ```python block of README.md, unchanged, in a fresh interpreter where torch and the
    other training extras cannot be imported (the shipped default bundle, no $STAR_BUNDLE)."""
    from star_training.entry import TRAIN_MODULES

    code = code_blocks("python")[index]
    done = python(BLOCK.format(names=TRAIN_MODULES) + code, tmp_path)
    assert done.returncode == 0, f"README example {index}:\n{code}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip()


# -- star-chat's edges ------------------------------------------------------------------------------
def test_star_chat_refuses_an_empty_model_path(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "star_runtime.chat", "--model", ""], input=b"hi\n",
                          capture_output=True, timeout=120, cwd=tmp_path)
    err = done.stderr.decode()
    assert done.returncode == 2 and done.stdout == b"" and err.count("\n") == 1, err
    assert "--model is empty" in err and "Traceback" not in err


def test_star_chat_with_stdout_closed_is_one_line(tmp_path) -> None:
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m star_runtime.chat >&- <<< hi"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("star-chat: error: stdout is closed") and "Traceback" not in done.stderr


# -- the real runtime-only install ------------------------------------------------------------------
@pytest.mark.slow
def test_runtime_only_venv_chats_and_the_training_commands_say_what_to_install(tmp_path) -> None:
    """python -m venv, then `pip install COPY` (no extras) of this checkout's files as git sees
    them; star-chat --version, star-train --help (exit 2, the extras line) and the README's
    Python examples as written. Needs the package index (numpy, onnxruntime, rich)."""
    copy = tmp_path / "star-esc"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STAR_BUNDLE", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    pip = subprocess.run([str(bin_dir / "pip"), "install", "-q", str(copy)], env=env, capture_output=True,
                         text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert pip.returncode == 0, pip.stderr
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"runtime-only install: {seconds:.0f} s, venv {size / 1e6:.0f} MB")
    version = metadata.version("star-esc")

    def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, **kw)

    assert run("star-chat", "--version").stdout.strip() == f"star-chat {version}"
    for prog in ("star-train", "star-eval", "star-judge", "star-analyze", "star-export"):
        done = run(prog, "--help")
        assert done.returncode == 2 and "needs the training extras: pip install 'star-esc[train]'" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    heavy = run(str(bin_dir / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))")
    assert heavy.stdout.strip() == "None"
    serve = run("star-serve", "--port", "0")  # no serve extra: one line saying which to install
    assert serve.returncode == 2 and "pip install 'star-esc[serve]'" in serve.stderr, serve.stderr
    assert serve.stderr.count("\n") == 1 and "Traceback" not in serve.stderr
    for code in code_blocks("python"):
        done = run(str(bin_dir / "python"), "-c", code)
        assert done.returncode == 0, f"{code}\n{done.stderr}"
    chat = run("star-chat", input="hello\n")
    assert chat.returncode == 0 and '"reply"' in chat.stdout, chat.stderr


def test_every_python_package_folder_is_in_the_distribution() -> None:
    """setuptools installs only the packages pyproject lists: a sub-package left out (as
    star_runtime.safety once was) is missing from a non-editable install, which the editable one
    used by this suite does not show."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: REPO / tool.get("package-dir", {}).get(name, name) for name in tool["packages"] if "." not in name}
    listed = set(tool["packages"])
    for top, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            assert ".".join((top, *parts)) in listed, f"{init.parent} is not in pyproject's packages"
