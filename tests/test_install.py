"""Installation: the package works from a wheel installed anywhere, and serving installs no test tools.

The wheel test builds the wheel from a copy of the project (offline, with the setuptools already in the test
environment), installs it with ``--no-deps`` into a fresh virtual environment outside the repository, and serves from a
directory outside the repository. Installing the dependencies again (torch, transformers, gradio…) would take minutes
and, here, network access; so the fresh environment gets them from this environment instead, through a ``.pth`` file
naming this environment's site-packages. A path line in a ``.pth`` file only appends that folder to ``sys.path``
(after the fresh environment's own site-packages); the ``.pth`` files inside it are not run, so this environment's
editable install of Few-Shot Bot (its import hook, or its path to the checkout) does not leak in: ``app``,
``retrievers`` and the skills and prompts can only come from the wheel, which the test checks.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from app.settings import REPO_ROOT
from tests.conftest import free_port

TEST_TOOLS = {"pytest", "openai", "playwright", "hypothesis", "schemathesis", "llama-cpp-python"}
SHIPPED = ("pyproject.toml", "setup.py", "README.md", "app", "retrievers", "skills", "prompts")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSB_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of its files (the build leaves nothing in the checkout)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SHIPPED:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("few_shot_bot-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment outside the repository with only the wheel installed (see the module docstring)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_fsb_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _site_packages(venv: Path) -> Path:
    (site,) = (venv / "lib").glob("python3*/site-packages")
    return site.resolve()


def test_editable_install_finds_the_checkout_folders_through_the_import_system(tmp_path):
    """In the development (editable) install, from a directory outside the checkout, the defaults are the checkout's
    skills/ and prompts/ (mapped by setuptools' import hook); FSB_SKILLS_DIR and FSB_PROMPTS_DIR still win."""
    code = "from app.settings import Settings; s = Settings.load(); print(s.skills_dir); print(s.prompts_dir)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), check=True,
                         capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert Path(out[0]).resolve() == (REPO_ROOT / "skills").resolve()
    assert Path(out[1]).resolve() == (REPO_ROOT / "prompts").resolve()
    env = _clean_env(FSB_SKILLS_DIR=str(tmp_path / "s"), FSB_PROMPTS_DIR=str(tmp_path / "p"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert out[:2] == [str(tmp_path / "s"), str(tmp_path / "p")]


def test_the_wheel_ships_skills_prompts_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*(REPO_ROOT / "skills").glob("*.y*ml"), *(REPO_ROOT / "prompts").glob("*.y*ml")]:
        assert f"fsb_assets/{path.parent.name}/{path.name}" in names
    for init in [*(REPO_ROOT / "app").rglob("__init__.py"), *(REPO_ROOT / "retrievers").rglob("__init__.py")]:
        assert init.relative_to(REPO_ROOT).as_posix() in names  # every code package
    assert "app/lm/tiny_corpus.txt" in names
    assert any(n.startswith("retrievers/starter_kb/") for n in names)
    assert not any(n.startswith(("skills/", "prompts/", "tests/")) for n in names)


def test_wheel_installed_outside_the_repository_serves_a_chat(installed, tmp_path):
    site = _site_packages(installed)
    code = ("import app, retrievers; from app.settings import Settings; s = Settings.load(); "
            "print(app.__file__); print(retrievers.__file__); print(s.skills_dir); print(s.prompts_dir)")
    out = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, env=_clean_env(),
                         check=True, capture_output=True, text=True, timeout=120).stdout.split("\n")[:4]
    for path in map(Path, out):
        assert path.resolve().is_relative_to(site), path
        assert not path.resolve().is_relative_to(REPO_ROOT.resolve()), path
    assert Path(out[2]).name == "skills" and (Path(out[2]) / "persona.yaml").is_file()
    assert (Path(out[3]) / "selector.yaml").is_file()

    port = free_port()
    log = tmp_path / "serve.log"
    # the selector's warm-up (a minute on 2 busy cores) proves nothing about the install: off; the starter knowledge
    # base (package data of retrievers) stays on
    env = _clean_env(FSB_DATA_DIR=str(tmp_path / "data"), FSB_SELECTOR="off", FSB_LOG_LEVEL="warning")
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(installed / "bin" / "fsb"), "serve", "--model", "tiny", "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(url + "/healthz", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert health is not None and health.status_code == 200, log.read_text()[-3000:]
        assert health.json()["skills"] == len(list((REPO_ROOT / "skills").glob("*.y*ml")))
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "fsb", "max_tokens": 8, "messages": [{"role": "user", "content": "hi! what do you like to do?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _dry_run(target: str) -> str:
    """The commands `make TARGET` runs on a machine where nothing is installed yet: the venv path names nothing
    (`make -n` only prints the commands)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-n", target, "VENV=/nonexistent/fresh-venv"], cwd=REPO_ROOT, check=True,
                          capture_output=True, text=True, timeout=60).stdout


def test_make_serve_installs_no_test_tools():
    serve = _dry_run("serve")
    assert "pip install --quiet -e ." in serve and "server.py" in serve
    for tool in [*TEST_TOOLS, "[dev]", "chromium", "CMAKE_ARGS"]:
        assert tool not in serve, tool
    test = _dry_run("test")  # ...and `make test` does install them
    assert '-e ".[dev]"' in test and "llama-cpp-python" in test and "chromium" in test


def test_runtime_dependencies_bring_no_test_tools(wheel):
    """The wheel's requirements without extras, followed through every installed distribution's own requirements:
    nothing `pip install .` pulls in is a test tool."""
    from importlib import metadata

    from packaging.requirements import Requirement

    meta = zipfile.ZipFile(wheel).read(next(n for n in zipfile.ZipFile(wheel).namelist()
                                            if n.endswith(".dist-info/METADATA"))).decode()
    direct = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
              if line.startswith("Requires-Dist:")]
    runtime = [r for r in direct if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert {_norm(r.name) for r in direct} & TEST_TOOLS, "the dev extra should list the test tools"
    seen: set[str] = set()
    todo = [_norm(r.name) for r in runtime]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_norm(r.name) for r in map(Requirement, requires)
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert "torch" in seen and "fastapi" in seen
    assert seen & TEST_TOOLS == set()
