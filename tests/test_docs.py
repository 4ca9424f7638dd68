"""The documentation is tested: the site builds with `mkdocs build --strict`, every public name has an API reference
entry, and the Python and shell examples of README.md and docs/ run.

Examples run in a workspace laid out as after `make demo`, on the demo world's tiny policy: `outputs/demo/world`
(built by `lenvm_rl.demo`, offline) and `outputs/demo/lenvm` (a LenVM with a fresh head on the demo policy), with
`recipes/` and `accelerate_configs/` linked in. The blocks of one page run in order, in one namespace, as a reader
would paste them. Shell commands run in this process: `python script.py ...` and `accelerate launch [options]
script.py ...` (one process; the launcher's `--config_file` must exist) run the script as `__main__` with its
arguments, `python -m module ...` runs the module.

An HTML comment right above a block (invisible on GitHub and on the site) changes how it runs:

    <!-- docs-test: skip: <why it cannot run here> -->
    <!-- docs-test: replace: <text> -> <smaller text> -->    (several lines allowed; each text must occur)

`replace` shrinks a run (fewer steps or problems); it never changes which code runs. Files that a skipped block names
(`recipes/...`, `accelerate_configs/...`) must still exist.
"""

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

import lenvm_rl

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = {"bash", "sh", "shell"}
REPO_DIRS = ("recipes/", "accelerate_configs/", "benchmarks/", "docs/", "lenvm_rl/", "tests/", "tools/")
HISTORY_WORDING = re.compile(r"previous version|this version|issue #", re.IGNORECASE)


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    skip: str | None = None
    replacements: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path) -> list[Block]:
    """The fenced python / shell blocks of a page with the `docs-test` directive above each."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+)(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        start, indent, ticks, language = i, fence.group(1), fence.group(2), fence.group(3)
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i][len(indent) :])
            i += 1
        i += 1
        if language in SHELL or language == "python":
            block = Block(page, start + 1, language, "\n".join(body) + "\n")
            _read_directive(lines, start, block)
            blocks.append(block)
    return blocks


def _read_directive(lines: list[str], fence_index: int, block: Block) -> None:
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].strip().endswith("-->"):
        return
    end = j
    while j >= 0 and "<!--" not in lines[j]:
        j -= 1
    comment = "\n".join(lines[j : end + 1]).strip()[len("<!--") : -len("-->")].strip()
    if not comment.startswith("docs-test:"):
        return
    for entry in comment[len("docs-test:") :].strip().splitlines():
        key, _, value = entry.strip().partition(":")
        if key == "skip":
            block.skip = value.strip()
        elif key == "replace":
            old, arrow, new = value.strip().partition(" -> ")
            assert arrow, f"{block.name}: 'replace: <text> -> <smaller text>', got {entry!r}"
            block.replacements.append((old, new))
        else:
            raise AssertionError(f"{block.name}: unknown docs-test directive {entry!r}")


ALL_BLOCKS = [block for page in PAGES for block in parse_blocks(page)]
RUNNABLE_PAGES = sorted({block.page for block in ALL_BLOCKS if block.skip is None})


# ----------------------------------------------------------------------------------------------------------------
# The site


def test_site_builds_strict(tmp_path):
    """A broken link, a page missing from the nav, an API reference that does not resolve or a docstring the
    reference cannot parse fails the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    home = (tmp_path / "site" / "index.html").read_text()
    assert "Quick examples" in home  # the README is the home page
    reference = (tmp_path / "site" / "reference" / "configs" / "index.html").read_text()
    assert "length_coef" in reference and "lenvm_model_name_or_path" in reference


def test_every_public_name_has_a_reference_entry():
    targets = set()
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        targets |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M))
    documented = {target.rsplit(".", 1)[-1] for target in targets}
    missing = [name for name in lenvm_rl.__all__ if name not in documented]
    assert not missing, f"public names without an entry in docs/reference/: {missing}"


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_pages_state_results_not_history(page):
    """A figure states its command, seeds and hardware; how it changed over time is in git."""
    found = HISTORY_WORDING.findall(page.read_text())
    assert not found, f"{page.relative_to(ROOT)}: {found}"


# ----------------------------------------------------------------------------------------------------------------
# The examples


def shell_commands(code: str) -> list[list[str]]:
    """Commands of a shell block: continuation lines joined, comments dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)  # raises on a quote left open (write placeholders as <name>)
        if argv:
            commands.append(argv)
    return commands


def test_examples_are_well_formed():
    """Every block, skipped or not, parses; every repository file a command names exists."""
    assert ALL_BLOCKS, "no examples found"
    for block in ALL_BLOCKS:
        if block.language == "python":
            compile(block.code, block.name, "exec")
            continue
        for argv in shell_commands(block.code):
            for token in argv:
                path = token.split("=", 1)[-1]
                if path.startswith(REPO_DIRS) and not any(c in path for c in "*{<"):
                    assert (ROOT / path).exists(), f"{block.name}: {path} does not exist"


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory):
    """outputs/demo/world and outputs/demo/lenvm as `make demo` leaves them (the LenVM untrained), and the recipes."""
    from lenvm_rl.demo.world import build_demo_world
    from lenvm_rl.modeling import LengthValueModel

    root = tmp_path_factory.mktemp("docs_workspace")
    for name in ("recipes", "accelerate_configs"):
        (root / name).symlink_to(ROOT / name)
    world = build_demo_world(root / "outputs" / "demo" / "world")
    lenvm = LengthValueModel.from_backbone(world / "policy", gamma=0.98, generator_model="demo policy")
    lenvm.prompt_format = {"system_prompt": None, "instruction": None}  # the demo policy's bare questions
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(world / "policy")
    lenvm.save_pretrained(root / "outputs" / "demo" / "lenvm", tokenizer=tokenizer)
    return root


def run_shell_command(argv: list[str]) -> None:
    env = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    if argv[:2] == ["accelerate", "launch"]:
        argv = argv[2:]
        while argv and argv[0].startswith("--"):
            option = argv.pop(0)
            value = argv.pop(0) if "=" not in option else option.split("=", 1)[1]
            if option.startswith("--config_file"):
                yaml.safe_load(Path(value).read_text())  # exists and parses
            if option.startswith("--num_processes"):
                assert int(value) == 1, "the docs runner launches one process"
        argv = ["python", *argv]
    assert argv[0] == "python", f"the docs runner runs python commands only, got {argv[0]!r}: mark the block skip"
    saved_argv, saved_env = sys.argv, {key: os.environ.get(key) for key in env}
    saved_threads = torch.get_num_threads()  # recipes may set their own (--num_threads); the suite runs on one
    os.environ.update(env)
    try:
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (None, 0), f"{shlex.join(argv)} exited with {exit.code}"
    finally:
        torch.set_num_threads(saved_threads)
        sys.argv = saved_argv
        for key, value in saved_env.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE_PAGES])
def test_examples_run(page, demo_workspace, tmp_path, monkeypatch):
    workspace = tmp_path / "workspace"
    shutil.copytree(demo_workspace, workspace, symlinks=True)
    monkeypatch.chdir(workspace)
    namespace: dict = {"__name__": "__docs__"}
    for block in parse_blocks(page):
        if block.skip is not None:
            assert block.skip, f"{block.name}: say why the block is skipped"
            continue
        code = block.code
        for old, new in block.replacements:
            assert old in code, f"{block.name}: the text to replace, {old!r}, is not in the block"
            code = code.replace(old, new)
        started, cpu_started = time.perf_counter(), time.process_time()
        if block.language == "python":
            exec(compile(code, block.name, "exec"), namespace)
        else:
            for argv in shell_commands(code):
                run_shell_command(argv)
        print(f"{block.name}: {time.perf_counter() - started:.1f} s, {time.process_time() - cpu_started:.1f} s of CPU")
