"""Every ```python block of README.md and docs/*.md runs, so that no snippet can rot.

The files are found when the tests are collected (``README.md`` and whatever ``docs/*.md`` exist then). The blocks of
one file run in order in one fresh interpreter and share one namespace, so a later block may use what an earlier one
defined (the README's quick start defines ``pipe``; the sections after it use it). Each file runs in its own temporary
working directory (snippets that save a checkpoint write there), on the CPU, as a user's session would: without
``TRITON_INTERPRET`` (so the ops take their torch path) and offline (``HF_HUB_OFFLINE=1``). A snippet that needs a
pipeline uses one that ships with ditkern (``pipe = ditkern.zoo.load("digits-flux")``) and small step counts.

One marker is understood, an HTML comment on the lines right above a fence (visible in the markdown source)::

    <!-- no-run: why this block cannot run on a CPU -->

Such a block is only compiled (its syntax is checked) and is reported as a skipped test with that reason, so the
blocks that do not run are counted and listed (``pytest -rs``). Nothing else is hidden: there is no setup code the
reader does not see.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*no-run\b(.*?)-->\s*$")
PYTHON = ("python", "py", "python3")
TIMEOUT_S = 600  # all files together; they take well under a minute


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    line: int  # 1-based line of the first code line
    code: str  # dedented
    no_run: str | None  # the marker's reason, or None: the block runs


def doc_files() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]


def extract(text: str, rel: str) -> tuple[list[Block], list[str]]:
    """The python blocks of the markdown ``text`` of file ``rel``, and the problems with its markers."""
    lines = text.splitlines()
    blocks, problems = [], []
    pending: tuple[int, str] | None = None  # a no-run marker waiting for its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        fence = FENCE.match(line)
        if marker:
            reason = marker.group(1).strip().lstrip(":").strip()
            if not reason:
                problems.append(f"{rel}:{i + 1}: a no-run marker must say why (<!-- no-run: reason -->)")
            pending = (i + 1, reason)
            i += 1
            continue
        if fence:
            _, ticks, lang = fence.groups()
            end = i + 1
            while end < len(lines) and lines[end].strip() != ticks:
                end += 1
            if lang.lower() in PYTHON:
                code = textwrap.dedent("\n".join(lines[i + 1 : end]))
                blocks.append(Block(rel, i + 2, code, pending[1] if pending else None))
            elif pending:
                problems.append(f"{rel}:{pending[0]}: no-run marker above a {lang or 'plain'} block, not a python one")
            pending = None
            i = end + 1
            continue
        if pending and line.strip():
            problems.append(f"{rel}:{pending[0]}: no-run marker not directly above a ```python fence")
            pending = None
        i += 1
    if pending:
        problems.append(f"{rel}:{pending[0]}: no-run marker at the end of the file")
    return blocks, problems


EXTRACTED = {str(p.relative_to(ROOT)): extract(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
             for p in doc_files()}  # fmt: skip
RUN = {f: [b for b in blocks if b.no_run is None] for f, (blocks, _) in EXTRACTED.items()}
NO_RUN = [b for blocks, _ in EXTRACTED.values() for b in blocks if b.no_run is not None]

# The worker: runs the files named in a JSON job (stdin), each in a fresh namespace and its own empty working directory,
# and writes one JSON result per file. Each block is compiled under the markdown file's path, shifted to its line
# there, so a traceback names (and shows) the line of the README/doc. One process for all files: importing torch,
# diffusers and transformers once is most of the time a file takes.
RUNNER = """
import json, os, sys, time, traceback
job = json.load(sys.stdin)
with open(job["results"], "w") as results:
    for doc, blocks in job["files"].items():
        cwd = os.path.join(job["workdir"], doc.replace(os.sep, "_"))
        os.makedirs(cwd)
        os.chdir(cwd)
        ns, line, error, t0 = {"__name__": "__main__"}, None, None, time.perf_counter()
        try:
            for b in blocks:
                line = b["line"]
                print(f"--- {doc}:{line}", flush=True)
                exec(compile("\\n" * (line - 1) + b["code"], b["path"], "exec"), ns)
        except BaseException:
            error = traceback.format_exc()
        os.chdir(job["workdir"])
        seconds = time.perf_counter() - t0
        results.write(json.dumps({"doc": doc, "line": line, "error": error, "seconds": seconds}) + "\\n")
        results.flush()
"""


def _env() -> dict[str, str]:
    drop = ("TRITON_INTERPRET", "DITKERN_BACKEND")  # the conftest's interpreter, a forced backend: not a user's CPU run
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    # one intra-op thread: the snippets' tensors are tiny, and on a shared CPU the threads' synchronisation costs far
    # more than they compute (measured on 2 busy cores: the quant.md GPTQ snippet 7.7 s with one thread, 129 s with two)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@dataclass(repr=False)
class DocsRun:
    results: dict  # {doc: {"line": the block that ran last, "error": traceback or None, "seconds": ...}}
    proc: subprocess.CompletedProcess

    def __repr__(self):  # pytest prints a failing test's arguments: the file's own traceback is what matters
        return f"DocsRun({len(self.results)} file(s), exit status {self.proc.returncode})"


@pytest.fixture(scope="module")
def docs_run(request, tmp_path_factory) -> DocsRun:
    """Runs the selected files' blocks once, in one worker process."""
    selected = [item.callspec.params["doc"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_snippets_run"]  # fmt: skip
    work = tmp_path_factory.mktemp("docs")
    job = {"results": str(work / "results.jsonl"), "workdir": str(work),
           "files": {doc: [{"line": b.line, "code": b.code, "path": str(ROOT / b.file)} for b in RUN[doc]]
                     for doc in selected}}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(job), cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    path = Path(job["results"])
    results = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return DocsRun({r["doc"]: r for r in results}, proc)


def test_the_docs_have_snippets():
    assert "README.md" in EXTRACTED and RUN["README.md"], "no ```python block found in README.md: is the parser broken?"


def test_extract_reads_fences_and_markers():
    text = "\n".join([
        "# doc", "```python", "a = 1", "```", "```bash", "python -c 'not python'", "```",
        "- a list item:", "", "  ```python", "  b = a + 1", "  if b:", "      c = b", "  ```",
        "<!-- no-run: needs a CUDA GPU -->", "```python", "d = torch.cuda.current_device()", "```",
        "<!-- no-run -->", "```py", "e = 1", "```", "<!-- no-run: stray -->", "text", "```python", "f = 1", "```",
    ])  # fmt: skip
    blocks, problems = extract(text, "x.md")
    assert [(b.line, b.code, b.no_run) for b in blocks] == [
        (3, "a = 1", None), (11, "b = a + 1\nif b:\n    c = b", None),
        (17, "d = torch.cuda.current_device()", "needs a CUDA GPU"), (21, "e = 1", ""), (26, "f = 1", None),
    ]  # fmt: skip
    assert problems == ["x.md:19: a no-run marker must say why (<!-- no-run: reason -->)",
                        "x.md:23: no-run marker not directly above a ```python fence"]  # fmt: skip


def test_markers_are_well_formed():
    problems = [p for _, probs in EXTRACTED.values() for p in probs]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", [f for f, blocks in RUN.items() if blocks])
def test_snippets_run(doc, docs_run):
    results, proc = docs_run.results, docs_run.proc
    if doc not in results:
        pytest.fail(f"{doc}: the worker stopped before this file (exit status {proc.returncode})\n"
                    f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}")  # fmt: skip
    r = results[doc]
    if r["error"]:
        pytest.fail(f"{doc}: the block at line {r['line']} failed (a file's blocks run in order in one namespace)\n"
                    f"{r['error']}")  # fmt: skip


@pytest.mark.parametrize("block", NO_RUN or [None], ids=[f"{b.file}:{b.line}" for b in NO_RUN] or ["none"])
def test_no_run_blocks(block):
    """A block marked no-run still has to be valid Python; it is listed as skipped with its reason."""
    if block is None:
        return
    compile(block.code, f"{block.file}:{block.line}", "exec")
    pytest.skip(f"no-run ({block.file}:{block.line}): {block.no_run}")
