"""Run the reliability tests and record their counts in bench/RESULTS.md (section "Reliability"); or run the
trust cases on two commits' code (section "trust").

    python bench/reliability.py            # runs the tests (~2 min on 2 free cores), rewrites the section
    python bench/reliability.py --dry-run  # print the section instead of writing it
    python bench/reliability.py --cases --before 31db6ac   # bench/trust_cases.py before and after

The tests (tests/test_reliability_inputs.py, test_reliability_faults.py, test_unsafe_files.py, test_io.py)
add their counts (bad inputs tried / handled, faults injected / survived, unsafe files tried / refused) to the
JSON file named by $LVIT_RELIABILITY_COUNTS; this script runs them with that variable set and turns the JSON
into a table. Only the text between the reliability markers of RESULTS.md is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import REPO, bench_module

RESULTS = REPO / "bench" / "RESULTS.md"
TEST_FILES = ["tests/test_io.py", "tests/test_reliability_inputs.py", "tests/test_reliability_faults.py",
              "tests/test_unsafe_files.py"]
COUNTS_ENV = "LVIT_RELIABILITY_COUNTS"


def run_tests(counts_file: Path) -> tuple[int, str, float, float]:
    """(pytest exit code, its summary line, wall seconds, CPU seconds of pytest and its children)."""
    import resource

    env = {**os.environ, COUNTS_ENV: str(counts_file)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={counts_file.parent / 'tmp'}",
           *TEST_FILES]
    started = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if done.returncode != 0:
        print(done.stdout[-4000:], file=sys.stderr)
    summary = next((line for line in reversed(done.stdout.splitlines()) if " in " in line and
                    ("passed" in line or "failed" in line)), "(no pytest summary)")
    return done.returncode, summary.strip("= "), time.perf_counter() - started, cpu


ATTEMPT_VERBS = ("tried", "injected")


def table_rows(counts: dict) -> list[str]:
    """Counts keyed "SUBJECT: VERB" (tried/handled, injected/survived, tried/refused) -> table rows."""
    rows = []
    for area, figures in sorted(counts.items()):
        subjects: dict[str, dict[str, int]] = {}
        for key, value in figures.items():
            subject, _, verb = key.rpartition(": ")
            subjects.setdefault(subject or key, {})[verb if subject else "n"] = value
        for subject, verbs in sorted(subjects.items()):
            if "n" in verbs:
                rows.append(f"| {area} | {subject} | {verbs['n']} | |")
                continue
            attempted = sum(v for k, v in verbs.items() if k in ATTEMPT_VERBS)
            ended = {k: v for k, v in verbs.items() if k not in ATTEMPT_VERBS}
            done = ", ".join(f"{v} {k}" for k, v in ended.items()) or "0"
            rows.append(f"| {area} | {subject} | {attempted} | {done} |")
    return rows


def section(counts: dict, summary: str, seconds: float, cpu: float) -> str:
    lines = [
        "## Reliability",
        "",
        "Faults injected into real runs and broken or hostile files fed to the CLI. \"Ended cleanly\" means: a",
        "one-line error naming the file (exit 2; 1 with check-data's table), nothing half-written, the previous",
        "checkpoint intact and an exact resume, or, for valid oddities, correct handling. \"User path\" rows are",
        "commands used the wrong way round (clashing outputs, odd reports, absent devices, stale exports, lossy",
        "batches, bad flags; tests/badinputs `USER_PATH`): the promised one-line error or warning naming the file or",
        "flag, nothing written by a refused command, no model loaded before the inputs are checked. See",
        "docs/RELIABILITY.md.",
        "",
        "| area | case | attempted | ended cleanly |",
        "|---|---|---:|---|",
        *table_rows(counts),
        "",
        f"pytest: {summary}; {seconds:.0f} s wall, {cpu:.0f} s CPU, on {platform.machine()} with "
        f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at the end ({time.strftime('%Y-%m-%d')}).",
        "",
        "Command: `python bench/reliability.py` (runs " + ", ".join(f"`{t}`" for t in TEST_FILES) + ").",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    from lvit.core.io import write_marked_section

    write_marked_section(RESULTS, "reliability", text)


CASES_JSON = REPO / "bench" / "reliability_cases.json"


def _commit(rev: str = "HEAD") -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def run_trust_cases(before: str | None, out: Path) -> int:
    """Every case of bench/trust_cases.py on ``before``'s code (a git worktree) and on this checkout's; the raw
    results into ``out`` and the RESULTS.md section "trust"."""
    import shutil

    cases = bench_module("trust_cases")
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip())
    record = {"command": "python bench/reliability.py --cases" + (f" --before {before}" if before else ""),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        if before:
            tree = Path(tmp) / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), before], cwd=REPO, check=True,
                           capture_output=True)
            try:
                print(f"before ({_commit(before)}):", flush=True)
                record["before"] = {"commit": _commit(before),
                                    "results": cases.run_cases(tree / "src", Path(tmp) / "work-before")}
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
                shutil.rmtree(tree, ignore_errors=True)
        print(f"after ({_commit()}{' + uncommitted changes' if dirty else ''}):", flush=True)
        record["after"] = {"commit": _commit() + ("+" if dirty else ""),
                           "results": cases.run_cases(REPO / "src", Path(tmp) / "work-after")}
    from lvit.core.io import atomic_write_json, write_marked_section

    atomic_write_json(out, record)
    write_marked_section(RESULTS, "trust", trust_section(record))
    print(f"wrote {out} and the trust section of {RESULTS}")
    return 0


def trust_section(record: dict) -> str:
    after = record["after"]["results"]
    before = (record.get("before") or {}).get("results") or {}
    head = record["after"]["commit"]
    lines = ["## Runs, folders and masks a user can trust: before and after", "",
             "Each case is a real command line on small files, run on the code of two commits "
             "(`bench/trust_cases.py`; raw `bench/reliability_cases.json`). Outcome: handled = the promised one-line "
             "error or warning, or the right answer, nothing damaged; silent = a surprise nobody is told about; "
             "wrong = a wrong answer given as right; traceback.", "",
             f"| class | case | before ({record.get('before', {}).get('commit', '-')}) | after ({head}) |",
             "|---|---|---|---|"]
    for name, r in after.items():
        b = before.get(name)
        was = f"{b['kind']}: {b['detail']}" if b else "-"
        lines.append(f"| {r['class']} | {name.replace('_', ' ')} | {was} | {r['kind']}: {r['detail']} |")
    lines += ["", f"Machine: {record['machine']}; {record['date']}. Command: `{record['command']}`."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the section, do not write RESULTS.md")
    parser.add_argument("--cases", action="store_true",
                        help="run the trust cases (bench/trust_cases.py) instead of the reliability tests")
    parser.add_argument("--before", default=None, metavar="REV", help="with --cases: also run them on REV's code")
    parser.add_argument("--out", type=Path, default=CASES_JSON, help="with --cases: the raw results file")
    args = parser.parse_args()
    if args.cases:
        return run_trust_cases(args.before, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = Path(tmp) / "counts.json"
        code, summary, seconds, cpu = run_tests(counts_file)
        counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    text = section(counts, summary, seconds, cpu)
    print(text)
    if code != 0:
        print(f"reliability tests failed (pytest exit {code}); RESULTS.md not updated", file=sys.stderr)
        return 1
    if not args.dry_run:
        write_section(text)
        print(f"wrote the Reliability section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
