"""The shell blocks of README.md and docs/ run, in reading order, as one walk on the synthetic data and the tiny LLM.

Commands in documentation that nothing runs go stale unseen: a renamed flag, a moved config, a folder a later
command no longer finds. So every fenced shell block of the README and of the guides runs here in one temporary
working directory, or carries a marker saying what it needs and runs where that is installed. The conventions for
doc writers (what runs, the markers, the working directory) are in docs/README.md, "Shell blocks are tests".

One test per block, in reading order. A block's test first runs the earlier blocks it may use the files of (each
runs once per session; slow ones only for a slow block), so `-k`, `-m slow` and `-x` work on any block alone.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_checks import run_cli
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SHELLS = {"bash", "sh", "shell", "console"}
NEEDS = {"gpu", "vllm", "gemma", "data", "curl"}
REQUIRED_BY = {"vllm": "DELREC_REQUIRE_VLLM", "gemma": "DELREC_REQUIRE_GEMMA"}  # CI: a missing extra fails, not skips
LINKED = ("configs", "scripts", "accelerate_configs")  # what the walk's working directory shares with the checkout
MARKER = re.compile(r"^<!--\s*doc-test:(.*?)-->\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")
# a command line in a fence of another language: a prompt, or a command word followed somewhere by an option
STRAY_COMMAND = re.compile(r"^\s*(\$ |(delrec|make|pip|python|curl|accelerate|vllm)\s.*\s-)")
OPERATORS = set("();<>|&")
SHELL_CHARACTERS = set("$`*?~[")
# The ERR trap names the failing line; the EXIT trap stops and reaps what the block left in the background.
PRELUDE = ("set -eEo pipefail\n"
           "trap 'echo \"doc-test: line $LINENO exited $?\" >&2' ERR\n"
           "trap 'trap - ERR; set +e; kill $(jobs -p) 2>/dev/null; wait' EXIT\n")
FAILED_LINE = re.compile(r"doc-test: line (\d+) exited (\d+)")
BLOCK_TIMEOUT = 900  # seconds; the slowest block, the demo, takes about two minutes on 2 cores


@dataclass
class Command:
    first: int  # line numbers in the file
    last: int
    text: str  # continuation lines joined by newlines; a console prompt's `$ ` removed

    def one_line(self) -> str:
        return " ".join(part.strip() for part in self.text.replace("\\\n", "\n").splitlines())


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    body: list[str]
    marker: str = ""
    index: int = 0
    commands: list[Command] = field(default_factory=list)
    slow: bool = False
    needs: tuple[str, ...] = ()
    not_run: str = ""

    def script(self) -> str:
        """The block as a bash script, line for line (a console block's output lines left blank)."""
        lines = list(self.body)
        if self.lang == "console":
            starts = {c.first for c in self.commands}
            kept = {n for c in self.commands for n in range(c.first, c.last + 1)}
            lines = []
            for number, text in enumerate(self.body, self.line + 1):
                lines.append(text[2:] if number in starts else text if number in kept else "")
        return PRELUDE + "\n".join(lines) + "\n"


def doc_files() -> list[Path]:
    """README.md, then docs/README.md and the files its table links, in its order: the walk's reading order."""
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    return [ROOT / "README.md", ROOT / "docs" / "README.md",
            *(ROOT / "docs" / name for name in dict.fromkeys(re.findall(r"\]\(([\w-]+\.md)\)", index)))]


def strip_comment(line: str) -> str:
    """`line` without its shell comment: a `#` that starts a word outside quotes (bash's rule, escapes aside)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_commands(block: Block) -> list[Command]:
    """The commands of a block: comment and blank lines skipped, `\\` continuations joined; in a console block,
    only the `$ ` lines (and their continuations)."""
    commands: list[Command] = []
    current: Command | None = None
    for k, text in enumerate(block.body):
        number = block.line + 1 + k
        if current is not None:
            current.text += "\n" + text
            current.last = number
        else:
            if block.lang == "console":
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            current = Command(number, number, text)
            commands.append(current)
        if not strip_comment(text).rstrip().endswith("\\"):
            current = None
    return commands


def delrec_argv(command: Command) -> list[str] | None:
    """The argv after `delrec` when the command is one plain `delrec ...` call; None when it needs a shell."""
    text = " ".join(strip_comment(line).rstrip().removesuffix("\\") for line in command.text.splitlines())
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: bash will say what is wrong
        return None
    if not tokens or tokens[0] != "delrec":
        return None
    if any(set(token) <= OPERATORS or SHELL_CHARACTERS & set(token) for token in tokens):
        return None
    return tokens[1:]


def read_marker(block: Block) -> list[str]:
    """Set `slow`, `needs` and `not_run` from the block's marker; the problems found in it."""
    text = block.marker.strip()
    where = f"{block.path}:{block.line - 1}"
    if text.startswith("not run"):
        block.not_run = text.removeprefix("not run").lstrip(":").strip()
        return [] if block.not_run else [f"{where}: `not run` needs a reason: <!-- doc-test: not run: REASON -->"]
    problems, needs = [], []
    for word in filter(None, (part.strip() for part in text.split(","))):
        if word == "slow":
            block.slow = True
        elif word.startswith("needs ") and word.removeprefix("needs ").strip() in NEEDS:
            needs.append(word.removeprefix("needs ").strip())
        elif word in NEEDS and needs:  # `needs vllm, curl`: the list goes on
            needs.append(word)
        else:
            problems.append(f"{where}: unknown doc-test marker '{word}' (known: slow, needs {', '.join(sorted(NEEDS))}, "
                            "not run: REASON)")
    block.needs = tuple(needs)
    if not block.slow and not needs and not problems:
        problems.append(f"{where}: an empty doc-test marker")
    return problems


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The shell blocks of one file, and the problems that would leave a command unrun without anyone noticing."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT).as_posix()
    blocks, problems = [], []
    marker = None  # (line number, text) of a marker line; it belongs to a fence on the very next line
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if marker:
                problems.append(f"{rel}:{marker[0]}: a doc-test marker must be the line right before a shell fence")
            found = MARKER.match(lines[i].strip())
            marker = (i + 1, found.group(1)) if found else None
            i += 1
            continue
        lang = fence.group(1).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        body = lines[i + 1:end]
        if lang in SHELLS:
            block = Block(rel, i + 1, lang, body, marker[1] if marker else "")
            block.commands = split_commands(block)
            wrong = read_marker(block) if marker else []
            if wrong:  # never run a block whose marker may have meant `not run`
                block.not_run = "its doc-test marker is malformed (test_every_shell_block_is_run_or_marked says how)"
                problems += wrong
            if not block.commands:
                problems.append(f"{rel}:{i + 1}: a ```{lang} block with no command" +
                                (" (console commands start with `$ `)" if lang == "console" else ""))
            blocks.append(block)
        else:
            if marker:
                problems.append(f"{rel}:{marker[0]}: a doc-test marker before a ```{lang} fence, not a shell one")
            problems += [f"{rel}:{i + 2 + k}: a command in a ```{lang or '(plain)'} fence is never run; make the fence "
                         f"```bash (or ```console with `$ ` prompts)" for k, text in enumerate(body)
                         if STRAY_COMMAND.match(text)]
        marker = None
        i = end + 1
    return blocks, problems


def collect() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in doc_files():
        found, wrong = parse(path)
        blocks += found
        problems += wrong
    for index, block in enumerate(blocks):
        block.index = index
    return blocks, problems


BLOCKS, PROBLEMS = collect()


def missing(need: str) -> str | None:
    """Why a `needs` marker is not met here, or None."""
    if need == "gpu":
        import torch

        return None if torch.cuda.is_available() else "needs a CUDA GPU"
    if need == "vllm":
        return None if importlib.util.find_spec("vllm") else "needs vllm (make vllm)"
    if need == "gemma":
        from delrec.llm.gguf_import import INSTALL_HINT, PACKAGED_MODELS

        modules = ("gguf", PACKAGED_MODELS["gemma-3-270m"].module)
        return None if all(importlib.util.find_spec(m) for m in modules) else f"needs the [gemma] extra: {INSTALL_HINT}"
    if need == "data":
        return None if SHARED_DATA.is_dir() else f"needs the development data at {SHARED_DATA}"
    return None if shutil.which(need) else f"needs {need} on the PATH"


def runnable_here(block: Block) -> bool:
    return not block.not_run and not any(missing(need) for need in block.needs)


class Walk:
    """One working directory standing in for the repository root, and what each block did in it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.outcomes: dict[int, str] = {}  # block index -> "" (passed) or why it failed
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

    def run(self, block: Block, later: Block | None = None) -> None:
        """Run `block` once; fail (again, for each later block that needs it) when it failed."""
        if block.index not in self.outcomes:
            # what stays recorded when an in-process command raises instead of exiting
            self.outcomes[block.index] = f"{block.path}:{block.line}: a command raised (the traceback came with it)"
            argvs = [delrec_argv(c) for c in block.commands]
            in_process = not block.needs and None not in argvs
            self.outcomes[block.index] = self.in_process(block, argvs) if in_process else self.in_bash(block)
        if self.outcomes[block.index]:
            prefix = f"an earlier block, which {later.path}:{later.line} may use, failed: " if later else ""
            pytest.fail(prefix + self.outcomes[block.index], pytrace=False)

    def in_process(self, block: Block, argvs: list[list[str]]) -> str:
        """Plain `delrec` commands through `delrec.cli.main`, the console script's entry point, in this process:
        a new process each would spend seconds importing torch and transformers again."""
        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            for command, argv in zip(block.commands, argvs):
                code = run_cli(argv)
                if code != 0:
                    return f"{block.path}:{command.first}: `{command.one_line()}` exited {code} (its output is above)"
        finally:
            os.chdir(cwd)
        return ""

    def in_bash(self, block: Block) -> str:
        log = self.folder.parent / f"block-{block.index}.log"
        with open(log, "w", encoding="utf-8") as out:
            process = subprocess.Popen(["bash", "-c", block.script()], cwd=self.folder, env=self.env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # whatever outlived the block's own clean-up
                except ProcessLookupError:
                    pass
                process.wait()
        output = log.read_text(encoding="utf-8", errors="replace")
        print(output)
        if code == 0:
            return ""
        tail = output[-3000:]
        if code is None:
            return f"{block.path}:{block.line}: the block ran past {BLOCK_TIMEOUT} s\n{tail}"
        failed = FAILED_LINE.search(output)
        if not failed:
            return f"{block.path}:{block.line}: the block exited {code}\n{tail}"
        number = block.line + int(failed.group(1)) - PRELUDE.count("\n")  # bash names a command's last line
        command = next((c for c in block.commands if c.first <= number <= c.last), None)
        number, text = (command.first, command.one_line()) if command else (number, block.body[number - block.line - 1])
        return f"{block.path}:{number}: `{text.strip()}` exited {failed.group(2)}\n{tail}"


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Walk:
    root = tmp_path_factory.mktemp("doc-walk")
    folder = root / "checkout"
    folder.mkdir()
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    if SHARED_DATA.is_dir():  # `../shared/data` from the working directory, as from the checkout
        (root / "shared").mkdir()
        (root / "shared" / "data").symlink_to(SHARED_DATA)
    return Walk(folder)


def block_param(block: Block):
    marks = [pytest.mark.slow] if block.slow else []
    if block.not_run:
        marks.append(pytest.mark.skip(reason=f"not run: {block.not_run}"))
    return pytest.param(block, marks=marks, id=f"{block.path}:{block.line}")


@pytest.mark.parametrize("block", [block_param(block) for block in BLOCKS])
def test_block_runs(block, walk):
    for need in block.needs:
        reason = missing(need)
        if reason and os.environ.get(REQUIRED_BY.get(need, "")) == "1":
            pytest.fail(f"{REQUIRED_BY[need]}=1 but the block {reason}")
        if reason:
            pytest.skip(reason)
    for earlier in BLOCKS[:block.index]:
        if runnable_here(earlier) and (block.slow or not earlier.slow):
            walk.run(earlier, later=block)
    walk.run(block)


def test_every_shell_block_is_run_or_marked():
    listed = {path.name for path in doc_files()}
    unlisted = [f"docs/{p.name}: not in docs/README.md's table, so its blocks never run"
                for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in listed]
    assert not PROBLEMS + unlisted, "\n".join(PROBLEMS + unlisted)
    assert BLOCKS, "no shell block found: has the fence syntax changed?"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (lower case, punctuation dropped, spaces to hyphens, -1 ...)."""
    anchors, seen = set(), {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        in_fence ^= line.startswith("```")
        if in_fence or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_relative_links_resolve():
    """Moving a section breaks the links to it; every relative link of the README and docs/ must land."""
    broken = []
    for path in doc_files():
        in_fence = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            in_fence ^= line.startswith("```")
            for target in [] if in_fence else re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                linked = (path.parent / file).resolve() if file else path
                if not linked.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target}: no such file")
                elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target}: no such heading")
    assert not broken, "\n".join(broken)
