"""The manual cannot drift from the code: README.md and docs/ are checked against the repository.

- Every relative link in README.md and docs/*.md points to an existing file (and, for a `#anchor`
  into a Markdown file, to an existing heading).
- docs/configuration.md has one table row per config key of megavl/config_parts.py, with the
  dataclass default, and no row for a key that does not exist. `python tests/docs/test_manual.py`
  prints the key and default columns to paste when a key is added.
- The user pages hold no measurement diaries or defect histories (those live in benchmarks/ and
  CHANGELOG.md).
- The CPU commands of the fenced blocks marked runnable (```` ```bash runnable ````) run, in page
  order, in one temporary directory that links the repository's megavl/, configs/ and ds_configs/,
  shrunk to tiny sizes by `shrink` (2 training steps, a few hundred synthetic samples). A block's
  commands see the files earlier blocks wrote, as a reader following the pages would.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts: deepspeed, megavl-export, ...
# The pages whose runnable blocks run, in the order a reader meets them (later blocks use the files
# earlier ones wrote: the shards, the pre-training checkpoint, its export, the fine-tuned weights).
RUN_ORDER = ["docs/quickstart.md", "README.md", "docs/data.md", "docs/checkpoints.md",
             "docs/finetune.md", "docs/video.md"]
PAGES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md"),
                *(REPO / "benchmarks").glob("*.md")])
USER_PAGES = [p for p in PAGES if p.name != "CHANGELOG.md" and p.parent.name != "benchmarks"]


# ------------------------------------------------------------------------------------------ links
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(github_slug(line.lstrip("#")))
    return out


def relative_links(page: Path) -> list[tuple[int, str]]:
    found, in_code = [], False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for match in LINK.finditer(line):
            target = match.group(1) or match.group(2)
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                found.append((number, target))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = []
    for number, target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.relative_to(REPO)}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.relative_to(REPO)}:{number}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


# -------------------------------------------------------------------------------- configuration
def format_default(value: object) -> str:
    """A default as the YAML a recipe would write: `""`, `true`, `[0.5, 1.0]`, `1e-8`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, float):
        return repr(value).replace("e-0", "e-").replace("e+0", "e+")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_default(v) for v in value) + "]"
    return str(value)


def config_defaults() -> dict[str, str]:
    """{dotted key: formatted default} for every leaf field of megavl.config_parts.Config."""
    from megavl.config_parts import Config

    out: dict[str, str] = {}

    def walk(obj: object, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = format_default(value)

    walk(Config(), "")
    return out


ROW = re.compile(r"^\|\s*`([a-z_][a-z0-9_.]*)`\s*\|\s*`([^`]*)`\s*\|")


def documented_defaults(page: Path) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in page.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_config_key_is_documented_with_its_default() -> None:
    code, page = config_defaults(), documented_defaults(REPO / "docs" / "configuration.md")
    missing = [f"| `{k}` | `{v}` |" for k, v in code.items() if k not in page]
    stale = [k for k in page if k not in code]
    wrong = [f"{k}: documented `{page[k]}`, code `{v}`" for k, v in code.items() if k in page and page[k] != v]
    assert not (missing or stale or wrong), (
        "docs/configuration.md is out of date with megavl/config_parts.py\n"
        + "".join(f"missing row: {m}\n" for m in missing)
        + "".join(f"no such key: {s}\n" for s in stale) + "".join(f"wrong default: {w}\n" for w in wrong))


# ------------------------------------------------------------------------------------- history
# Phrases of a lab notebook: they belong in benchmarks/ reports and CHANGELOG.md, not on user pages.
NOTEBOOK = re.compile(r"\bround[ -]?\d|load average|bench\.lock|other (?:engineers|sessions|helpers)"
                      r"|\bissue \d+|\bhelper\b|UTC\b", re.IGNORECASE)


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_user_pages_hold_no_lab_notebook(page: Path) -> None:
    hits = [f"{page.relative_to(REPO)}:{n}: {line.strip()}"
            for n, line in enumerate(page.read_text().splitlines(), 1) if NOTEBOOK.search(line)]
    assert not hits, "\n".join(hits)


# -------------------------------------------------------------------------------- runnable blocks
def runnable_commands(page: Path) -> list[tuple[int, str]]:
    """(line, command) of every fenced ```bash runnable block; `\\` continuations joined, comments cut."""
    commands, block, start, lines = [], None, 0, page.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if block is None:
            if re.match(r"^```bash\s+runnable\s*$", line):
                block = []
            continue
        if line.startswith("```"):
            pending = ""
            for n, text in block:
                text = re.sub(r"(^|\s)#.*$", "", text).rstrip()  # a comment to the end of the line
                if not pending:
                    start = n
                pending += text[:-1] + " " if text.endswith("\\") else text
                if not text.endswith("\\"):
                    if pending.strip():
                        commands.append((start, pending.strip()))
                    pending = ""
            block = None
            continue
        block.append((number, line))
    return commands


# Tiny sizes: the pages show the demo's sizes; the test keeps the shard counts the recipes name
# (tiny.yaml reads train-{000000..000003}.tar, the video example train-{000000..000004}.tar).
SYNTH_SIZES = {
    "megavl-synth-shapes": {"--num-train": "256", "--num-val": "64", "--samples-per-shard": "64"},
    "megavl-synth-videos": {"--num-train": "80", "--num-val": "16", "--samples-per-shard": "16",
                            "--num-test": "16"},
    "megavl-synth-downstream": {"--num-train": "64", "--num-eval": "16"},
}
TRAIN_SETS = ["run.checkpoint_every=2", "data.num_workers=0"]
FIRST_STEPS, MORE_STEPS = "run.max_steps=2", "run.max_steps=4"


def shrink(argv: list[str], port: int) -> list[str]:
    """The command at tiny size: fewer synthetic samples, a free rendezvous port, and 2 training steps,
    or 4 where the page sets run.max_steps itself (it continues an earlier run for more steps)."""
    program = Path(argv[0]).name
    if program in SYNTH_SIZES:
        argv = list(argv)
        for flag, value in SYNTH_SIZES[program].items():
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            elif flag != "--num-test":
                argv += [flag, value]
        return argv
    if "megavl/train.py" in argv:
        if program == "deepspeed" and "--master_port" not in argv:
            argv = [argv[0], "--master_port", str(port), *argv[1:]]
        continued = any(arg.startswith("run.max_steps=") for arg in argv)
        argv = [MORE_STEPS if arg.startswith("run.max_steps=") else arg for arg in argv]
        return [*argv, "--set", *TRAIN_SETS, *([] if continued else [FIRST_STEPS])]
    return argv


ALLOWED = re.compile(r"^(megavl-[a-z-]+|python|deepspeed|ls|cat|test)$")


def workspace(tmp: Path) -> Path:
    for name in ("megavl", "configs", "ds_configs"):
        (tmp / name).symlink_to(REPO / name)
    return tmp


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    out.update(PATH=f"{BIN}{os.pathsep}{out['PATH']}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"), out.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_page_with_commands_is_run() -> None:
    pages = {str(p.relative_to(REPO)) for p in USER_PAGES if runnable_commands(p)}
    assert pages <= set(RUN_ORDER), f"add to RUN_ORDER: {sorted(pages - set(RUN_ORDER))}"


def test_runnable_commands_parse() -> None:
    for name in RUN_ORDER:
        for number, command in runnable_commands(REPO / name):
            argv = shlex.split(command)
            assert ALLOWED.match(argv[0]), f"{name}:{number}: runnable block starts {argv[0]!r}"


@pytest.mark.slow
def test_runnable_commands_run(tmp_path: Path) -> None:
    """Every runnable command of the manual, in page order, at tiny size (about 2 minutes on 2 cores)."""
    cwd, started = workspace(tmp_path), time.monotonic()
    for name in RUN_ORDER:
        for number, command in runnable_commands(REPO / name):
            argv = shrink(shlex.split(command), free_port())
            proc = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (f"{name}:{number}: `{command}` exited {proc.returncode}\n"
                                          f"ran: {shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    print(f"manual commands ran in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":  # the key and default columns of docs/configuration.md
    sys.path.insert(0, str(REPO))
    for key, default in config_defaults().items():
        print(f"| `{key}` | `{default}` |")
