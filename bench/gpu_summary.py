"""Summary of one bench/gpu_check.sh run: OUTDIR/summary.md + summary.json from what the stages left.

Reads OUTDIR/stages.txt ("name status seconds" lines), OUTDIR/gpu_tests.xml and sync_debug.xml
(pytest junit; both must exist) and
OUTDIR/bench/bench.json (bench/run_all.py); prints the markdown. Exit 0 when every stage passed
and no test failed, else 1. A missing file is reported as such, never as a pass.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_stages(out: Path) -> list[dict]:
    path = out / "stages.txt"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, status, seconds = line.split()
        rows.append({"stage": name, "status": int(status), "seconds": int(seconds),
                     "result": {0: "ok", 124: "timed out", 137: "killed"}.get(int(status), "failed")})
    return rows


JUNIT_FILES = ("gpu_tests.xml", "sync_debug.xml")  # one per test stage of gpu_check.sh


def read_tests(*xml_paths: Path) -> dict:
    if not xml_paths or not all(p.is_file() for p in xml_paths):
        return {"found": False, "tests": []}
    tests = []
    for case in (c for p in xml_paths for c in ET.parse(p).getroot().iter("testcase")):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                break
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "detail": detail})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"found": True, "counts": counts, "tests": tests}


def read_bench(out: Path) -> dict:
    path = out / "bench" / "bench.json"
    if not path.is_file():
        return {"found": False, "rows": []}
    return {"found": True, **json.loads(path.read_text())}


def markdown(summary: dict) -> str:
    lines = [f"# gpu_check {'(dry run, CPU) ' if summary['dry_run'] else ''}summary", "",
             f"Host: {summary['host']}; bench machine line: {summary['bench'].get('machine', 'no bench output')}", "",
             "| stage | result | exit | seconds |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['result']} | {s['status']} | {s['seconds']} |" for s in summary["stages"]]
    tests = summary["tests"]
    lines += ["", "## GPU-only tests", ""]
    if not tests["found"]:
        lines.append(f"a junit file ({', '.join(JUNIT_FILES)}) is missing: a test stage did not run")
    else:
        lines.append(", ".join(f"{v} {k}" for k, v in tests["counts"].items()))
        lines += ["", "| test | outcome | s | detail |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {t['detail'].replace('|', '/')} |"
                  for t in tests["tests"]]
    lines += ["", "## Benchmark rows", ""]
    rows = summary["bench"]["rows"]
    if not rows:
        lines.append("no bench.json: the bench stage did not finish")
    else:
        lines += ["| bench | case | metric | megavl | reference | ratio | goal | met | note |", "|---|" * 1 + "---|" * 8]
        for r in rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"
            cells = [r["bench"], r["case"], r["metric"], r["megavl"], f"{r['reference']} ({r['reference_name']})",
                     ratio, r["goal"] or "-", {True: "yes", False: "NO", None: "-"}[r["met"]], r["note"]]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines += ["", f"Overall: {'PASS' if summary['ok'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def summarise(out: Path, dry_run: bool) -> dict:
    stages, tests, bench = read_stages(out), read_tests(*(out / f for f in JUNIT_FILES)), read_bench(out)
    failed_rows = [r for r in bench["rows"] if str(r.get("note", "")).startswith("FAILED")]
    ok = (bool(stages) and all(s["status"] == 0 for s in stages) and tests["found"]
          and tests["counts"]["failed"] + tests["counts"]["error"] == 0 and bench["found"] and not failed_rows)
    return {"dry_run": dry_run, "host": platform.node(), "ok": ok, "stages": stages, "tests": tests,
            "bench": bench}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    summary = summarise(args.out, args.dry_run)
    text = markdown(summary)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
