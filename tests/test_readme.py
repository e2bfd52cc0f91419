"""The README runs as shown, and the documentation's links and the code's citations of it resolve.

The README's examples use the released weights (``Gamma.pth``, ``Gamma-Prompt.pth``), which cannot be downloaded here.
So the tests build the folder a reader would have: both files in the release's layout, holding a tiny random model
(``gamma_test`` / ``gamma_test_sdp``), and ``photos/`` with four pictures that scikit-image ships and one broken file.
Every ```python block of the README is run there, and every ``$ gamma ...`` / ``$ cat ...`` line of its ```console
blocks. What an example prints must match the output shown under it (the ```text block that follows a Python block,
the lines under a ``$`` line) line by line; only numbers with a decimal point may differ, since they are scores of a
random model, and they must be finite and in [0, 1]. Progress-bar lines are left out of the comparison.

``python tests/test_readme.py`` builds the folder in a temporary directory and prints what each example prints, for
pasting into the README.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import gamma
from gamma.cli import main as gamma_cli
from gamma.weights import release_state_dict

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

# A number with a decimal point (a score); integers (counts, row indices) must match exactly.
_DECIMAL = re.compile(r"(?<![\w.])-?\d*\.\d+(?:e[-+]?\d+)?")
_PROGRESS = re.compile(r"^scoring:")  # the `gamma score` progress bar (tqdm, on stderr)


# --------------------------------------------------------------------------------------------- the reader's folder
def build_workdir(root: Path) -> Path:
    """Write ``Gamma.pth`` and ``Gamma-Prompt.pth`` (tiny models, release layout) and ``photos/`` under ``root``."""
    from skimage import data

    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40)  # a JPEG header, no image
    for variant, file_name in (("gamma_test", "Gamma.pth"), ("gamma_test_sdp", "Gamma-Prompt.pth")):
        torch.manual_seed(0)
        torch.save(release_state_dict(gamma.create_model(variant)), root / file_name)
    return root


# --------------------------------------------------------------------------------------------- the README's examples
@dataclass
class Example:
    kind: str  # "python" or "console"
    line: int  # 1-based line of the opening fence in README.md
    code: str  # the Python source, or one console command (without "$ ")
    shown: str | None  # the output the README shows under it (None: no output block)


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, body) of every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append((m.group(1), start + 1, "\n".join(body)))
        i += 1
    return blocks


def readme_examples(text: str) -> list[Example]:
    """The runnable examples of a README: ```python blocks (output: the ```text block right after) and ``$`` lines."""
    blocks = fenced_blocks(text)
    examples = []
    for k, (lang, line, body) in enumerate(blocks):
        if lang == "python":
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            # The output block must follow directly (only blank lines or one line of prose in between).
            follows = nxt is not None and nxt[0] == "text" and nxt[1] - (line + body.count("\n") + 2) <= 3
            examples.append(Example("python", line, body, nxt[2] if follows else None))
        elif lang == "console":
            command, shown = None, []
            for row in body.splitlines() + ["$ "]:
                if row.startswith("$ "):
                    if command is not None:
                        examples.append(Example("console", line, command, "\n".join(shown)))
                    command, shown = row[2:].strip(), []
                else:
                    shown.append(row)
    return examples


def terminal_lines(raw: str) -> list[str]:
    """The lines a terminal would show for ``raw``: each carriage return overwrites the line from its start."""
    out = []
    for line in raw.split("\n"):
        screen = ""
        for piece in line.split("\r"):
            screen = piece + screen[len(piece):]
        out.append(screen.rstrip())
    while out and not out[-1]:
        out.pop()
    return out


@contextlib.contextmanager
def captured():
    """Collect stdout, stderr and log records (as an unconfigured program would print them) into one buffer."""
    buf = io.StringIO()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []  # logging.lastResort / the CLI's basicConfig then write to the redirected stderr
    # as in a fresh interpreter: gamma's loggers inherit the root's level (an earlier test may have set their own)
    ours = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict
            if name == "gamma" or name.startswith("gamma.")}
    for name in ours:
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        for handler in root.handlers:
            if handler not in saved:
                handler.close()
        root.handlers, root.level = saved, level
        for name, lvl in ours.items():
            logging.getLogger(name).setLevel(lvl)


def run_example(example: Example, workdir: Path) -> str:
    """Run one example in ``workdir``; returns what it printed."""
    old = Path.cwd()
    os.chdir(workdir)
    try:
        with captured() as buf:
            if example.kind == "python":
                code = compile(example.code, f"README.md, block at line {example.line}", "exec")
                exec(code, {"__name__": "__main__"})
            else:
                argv = shlex.split(example.code)
                if argv[0] == "gamma":
                    gamma_cli(argv[1:])
                elif argv[0] == "cat" and len(argv) == 2:
                    print(Path(argv[1]).read_text(), end="")
                else:
                    raise AssertionError(f"README.md line {example.line}: test_readme.py cannot run {example.code!r}")
        return buf.getvalue()
    finally:
        os.chdir(old)


def compare(shown: str, printed: str, where: str) -> None:
    """``printed`` matches ``shown`` line by line, decimal numbers aside; those must be scores in [0, 1]."""

    def lines(text: str) -> list[str]:
        return [ln for ln in terminal_lines(text) if not _PROGRESS.match(ln)]

    def masked(text: str) -> list[str]:
        return [" ".join(_DECIMAL.sub("#", ln).split()) for ln in lines(text)]

    assert masked(printed) == masked(shown), f"{where}: the README shows\n{shown}\nbut the example printed\n{printed}"
    for token in _DECIMAL.findall("\n".join(lines(printed))):
        value = float(token)
        assert math.isfinite(value) and 0.0 <= value <= 1.0, f"{where}: printed {token}, not a score in [0, 1]"


# --------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("reader"))


EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))


def test_readme_has_the_examples_the_issue_asks_for():
    python = [e for e in EXAMPLES if e.kind == "python"]
    console = [e for e in EXAMPLES if e.kind == "console"]
    assert any("gamma.create_model(" in e.code for e in python), "no Python scoring example"
    assert any("pyiqa.create_metric(" in e.code for e in python), "no pyiqa example"
    assert any(e.code.startswith("gamma score ") for e in console), "no command-line example"
    assert all(e.shown is not None and e.shown.strip() for e in EXAMPLES), "an example without its output"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.kind}-line{e.line}")
def test_readme_example_runs_as_shown(example, workdir):
    if example.kind == "console" and example.code.startswith("cat "):
        # The file is written by the command before it: run that first when this test runs alone.
        previous = EXAMPLES[EXAMPLES.index(example) - 1]
        if not (workdir / shlex.split(example.code)[1]).exists():
            run_example(previous, workdir)
    if example.kind == "console" and example.code.startswith("gamma score ") and "--out" in example.code:
        out = shlex.split(example.code)
        (workdir / out[out.index("--out") + 1]).unlink(missing_ok=True)  # a fresh run, as in the README
    printed = run_example(example, workdir)
    compare(example.shown, printed, f"README.md, example at line {example.line} ({example.code.splitlines()[0]!r})")


def test_readme_python_example_fails_when_the_api_it_uses_is_gone(workdir, monkeypatch):
    """The check is not vacuous: the first Python example breaks when a name it calls disappears."""
    example = next(e for e in EXAMPLES if e.kind == "python" and "gamma.create_model(" in e.code)
    monkeypatch.delattr(gamma, "create_model", raising=False)  # set once used; gamma loads its names on first use
    monkeypatch.delitem(gamma._EXPORTS, "create_model")  # ... from this table
    with pytest.raises(AttributeError):
        run_example(example, workdir)


def test_compare_catches_a_changed_output():
    compare("tensor([0.6094])", "tensor([0.5123])", "ok")
    with pytest.raises(AssertionError):
        compare("tensor([0.6094])", "tensor([[0.6094]])", "shape")
    with pytest.raises(AssertionError):
        compare("scored 4 image(s)", "scored 5 image(s)", "count")
    with pytest.raises(AssertionError):
        compare("tensor([0.6094])", "tensor([1.6094])", "range")
    assert terminal_lines("scoring:  20%\rscoring: 100%\nok\n") == ["scoring: 100%", "ok"]


# --------------------------------------------------------------------------------------------- links and citations
def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # '#' lines inside code blocks are not headings
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def _check_target(target: Path, anchor: str | None, where: str) -> None:
    assert target.is_file(), f"{where}: {target.relative_to(REPO)} does not exist"
    if anchor:
        assert anchor in _anchors(target), f"{where}: no heading for #{anchor} in {target.relative_to(REPO)}"


def test_readme_and_docs_links_resolve():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) >= 7, "README.md and the docs/ pages"
    readme_links = set()
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            link = m.group(1)
            if re.match(r"^[a-z]+:", link):  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = page if not path else (page.parent / path).resolve()
            _check_target(target, anchor or None, f"{page.relative_to(REPO)} links {link}")
            if page == README and path:
                readme_links.add(target)
    missing = {p for p in DOCS.glob("*.md")} - readme_links
    assert not missing, f"docs pages the README does not link: {sorted(p.name for p in missing)}"


def _code_files() -> list[Path]:
    files = [REPO / "train.py"]
    for folder in ("gamma", "tests", "scripts", "options"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yml", ".yaml") and p.is_file()]
    return files


def test_code_cites_documents_in_the_repository():
    outside = [
        "DESIGN" + ".md",  # the spec the project was written from; not in the repository
        "/work/" + "shared",
        "../" + "shared",
    ]
    cited = 0
    for path in _code_files():
        text = path.read_text(encoding="utf-8")
        for needle in outside:
            assert needle not in text, f"{path.relative_to(REPO)} cites {needle}, which is not in the repository"
        for m in re.finditer(r"docs/([\w-]+\.md)(?:#([\w-]+))?", text):
            _check_target(DOCS / m.group(1), m.group(2), f"{path.relative_to(REPO)} cites {m.group(0)}")
            cited += 1
    assert cited > 0  # the code's citations were found, so the check above ran


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_workdir(Path(tmp))
        for ex in EXAMPLES:
            if ex.kind == "console" and ex.code.startswith("gamma score ") and "--out" in ex.code:
                argv = shlex.split(ex.code)
                (folder / argv[argv.index("--out") + 1]).unlink(missing_ok=True)
            header = f"--- README.md line {ex.line}: {ex.kind}"
            text = run_example(ex, folder)
            sys.stdout.write(f"{header}\n" + (f"$ {ex.code}\n" if ex.kind == "console" else ""))
            sys.stdout.write("\n".join(terminal_lines(text)) + "\n")
