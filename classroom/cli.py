"""python -m classroom list | make DIR | grade DIR [--only ID,...] [--json FILE] | check

list   the exercises: id, where, level, points and the tests that grade each
make   a student copy of the repository in DIR: every solution region becomes
       raise NotImplementedError("exercise <id>: <what to write>"); no git history, no solution text anywhere
grade  run each exercise's tests against DIR's code and print a points table (a crash, a hang or a missing file costs
       that exercise's points only)
check  prove the grading: the student copy scores 0, the reference full marks, and every known-wrong answer in
       classroom/mutants/ less than full marks
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from classroom.exercises import EXERCISES, Exercise

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "classroom" / "mutants"
COPIED = ["*.py", "*.md", "requirements.txt", "pytest.ini", "tests", "notebooks", "benchmarks"]
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"


# --- regions -------------------------------------------------------------


def find_region(lines: list[str], function: str) -> tuple[int, int]:
    """(begin, end) line indices of the markers of the first solution region inside `function` (or Class.method)."""
    start = 0
    for name in function.split("."):
        pattern = re.compile(rf"^\s*(async\s+)?(def|class)\s+{re.escape(name)}\b")
        start = next((i for i in range(start, len(lines)) if pattern.match(lines[i])), None)
        if start is None:
            raise LookupError(f"no `{name}` found")
    begin = next((i for i in range(start, len(lines)) if lines[i].strip() == BEGIN), None)
    if begin is None:
        raise LookupError(f"`{function}` has no {BEGIN} line")
    end = next(i for i in range(begin, len(lines)) if lines[i].strip() == END)
    return begin, end


def replace_region(text: str, function: str, body: str | None, exercise_id: str = "", task: str = "") -> str:
    """`text` with the region inside `function` replaced by `body` (a stub when body is None), markers removed."""
    lines = text.split("\n")
    begin, end = find_region(lines, function)
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    if body is None:
        new = [f'{indent}raise NotImplementedError("exercise {exercise_id}: {task}")']
    else:
        new = [indent + line if line.strip() else "" for line in body.strip("\n").split("\n")]
    return "\n".join(lines[:begin] + new + lines[end + 1:])


def strip_markers(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if line.strip() not in (BEGIN, END))


def rewrite(path: Path, exercise: Exercise, body: str | None) -> None:
    """Cut `exercise` in the file at `path` (a script, or a notebook whose code cell holds the function)."""
    if path.suffix != ".ipynb":
        path.write_text(replace_region(path.read_text(), exercise.function, body, exercise.id, exercise.task))
        return
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code" and BEGIN in source:
            try:
                cell["source"] = replace_region(source, exercise.function, body, exercise.id, exercise.task)
                break
            except LookupError:
                continue
    else:
        raise LookupError(f"{path.name}: no code cell holds `{exercise.function}` with a solution region")
    path.write_text(json.dumps(notebook, indent=1) + "\n")


# --- copies --------------------------------------------------------------


def copy_repository(dest: Path) -> None:
    """The files a student needs, without git history, caches or the classroom's answers."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", ".pytest_cache")
    for pattern in COPIED:
        for src in ROOT.glob(pattern):
            target = dest / src.relative_to(ROOT)
            if src.is_dir():
                shutil.copytree(src, target, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)


def make_student_copy(dest: Path) -> None:
    copy_repository(dest)
    for exercise in EXERCISES:
        rewrite(dest / exercise.file, exercise, None)
    for path in dest.glob("*.py"):  # regions that are not (yet) exercises keep their code, not their markers
        path.write_text(strip_markers(path.read_text()))
    for path in dest.glob("notebooks/*.ipynb"):  # a notebook's exercise is answered in the notebook: cut them all
        notebook = json.loads(path.read_text())
        for cell in notebook["cells"]:
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            cell["source"] = cut_every_region(source, path.stem)
        path.write_text(json.dumps(notebook, indent=1) + "\n")


def cut_every_region(source: str, name: str) -> str:
    lines = source.split("\n")
    while any(line.strip() == BEGIN for line in lines):
        begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
        end = next(i for i in range(begin, len(lines)) if lines[i].strip() == END)
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        stub = f'{indent}raise NotImplementedError("exercise in notebooks/{name}.ipynb: write this function")'
        lines = lines[:begin] + [stub] + lines[end + 1:]
    return "\n".join(lines)


# --- grading -------------------------------------------------------------


def run_tests(directory: Path, exercise: Exercise, timeout: float = 600) -> tuple[bool, str]:
    """Run the exercise's tests in `directory`; (passed, last line of pytest's output or the reason it failed)."""
    missing = [t for t in exercise.tests if not (directory / t.split("::")[0]).exists()]
    if missing:
        return False, f"missing {missing[0]}"
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *exercise.tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return proc.returncode == 0, lines[-1] if lines else proc.stderr.strip()[-200:]


def grade(directory: Path, only: list[str] | None = None, workers: int = 2) -> list[dict]:
    chosen = [e for e in EXERCISES if not only or e.id in only]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda e: run_tests(directory, e), chosen))
    return [{"id": e.id, "points": e.points if ok else 0, "max": e.points, "passed": ok, "failed": not ok,
             "detail": detail} for e, (ok, detail) in zip(chosen, outcomes)]


def print_table(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['id']:<28} {r['points']:>3} / {r['max']:<3} {'passed' if r['passed'] else 'failed'}  {r['detail']}")
    print(f"{'total':<28} {sum(r['points'] for r in rows):>3} / {sum(r['max'] for r in rows)}")


# --- check ---------------------------------------------------------------


def mutants(exercise: Exercise) -> list[Path]:
    return sorted((MUTANTS / exercise.id).glob("*.py"))


def score_mutant(exercise: Exercise, mutant: Path) -> tuple[str, bool, str]:
    with tempfile.TemporaryDirectory() as tmp:
        copy_repository(Path(tmp))
        rewrite(Path(tmp) / exercise.file, exercise, mutant.read_text())
        passed, detail = run_tests(Path(tmp), exercise)
    return f"{exercise.id}/{mutant.stem}", passed, detail


def check(workers: int = 2, only: list[str] | None = None) -> int:
    problems, chosen = [], [e for e in EXERCISES if not only or e.id in only]
    for e in chosen:
        if len(mutants(e)) < 2:
            problems.append(f"{e.id}: {len(mutants(e))} known-wrong answers in classroom/mutants/{e.id}/ (need 2)")
    with tempfile.TemporaryDirectory() as tmp:
        make_student_copy(Path(tmp))
        student = grade(Path(tmp), only, workers=workers)
    problems += [f"{r['id']}: the student copy scores {r['points']}" for r in student if r["points"]]
    reference = grade(ROOT, only, workers=workers)
    problems += [f"{r['id']}: the reference fails its tests ({r['detail']})" for r in reference if r["failed"]]
    jobs = [(e, m) for e in chosen for m in mutants(e)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for name, passed, detail in pool.map(lambda job: score_mutant(*job), jobs):
            print(f"mutant {name:<44} {'NOT CAUGHT' if passed else 'caught'}  {detail}")
            if passed:
                problems.append(f"mutant {name} passes the tests")
    print(f"\n{len(chosen)} exercises, {len(jobs)} known-wrong answers: student copy "
          f"{sum(r['points'] for r in student)} points, reference {sum(r['points'] for r in reference)} of "
          f"{sum(e.points for e in chosen)}")
    for p in problems:
        print("problem:", p)
    return 1 if problems else 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m classroom", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises and the tests that grade them")
    make = sub.add_parser("make", help="write a student copy of the repository")
    make.add_argument("dir", help="where to write it (must not exist yet, or be empty)")
    grading = sub.add_parser("grade", help="grade a copy of the repository")
    grading.add_argument("dir", help="the copy to grade ('.' grades the reference)")
    grading.add_argument("--only", action="append", help="exercise ids, comma-separated or the flag repeated")
    grading.add_argument("--json", metavar="FILE", help="write the scores as JSON")
    checking = sub.add_parser("check", help="prove that the tests grade every exercise (stub 0, reference full, "
                              "mutants less)")
    checking.add_argument("--only", action="append", help="exercise ids, comma-separated or the flag repeated")
    args = parser.parse_args(argv)
    only = ",".join(args.only).split(",") if getattr(args, "only", None) else None
    unknown = sorted(set(only or []) - {e.id for e in EXERCISES})
    if unknown:
        parser.error(f"--only {unknown[0]}: no such exercise (python -m classroom list)")
    if args.command == "list":
        for e in EXERCISES:
            print(f"{e.id:<28} {e.file}:{e.function}  {e.stars:<3} {e.points} pts  {', '.join(e.tests)}")
    elif args.command == "make":
        dest = Path(args.dir)
        if dest.exists() and any(dest.iterdir()):
            parser.error(f"make {args.dir}: the folder exists and is not empty (give a new one)")
        make_student_copy(dest)
        print(f"student copy written to {dest} ({len(EXERCISES)} exercises)")
    elif args.command == "grade":
        if not Path(args.dir).is_dir():
            parser.error(f"grade {args.dir}: no such folder")
        rows = grade(Path(args.dir).resolve(), only)
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"exercises": [{k: r[k] for k in ("id", "points", "max", "passed", "failed")} for r in rows],
                                                   "total": sum(r["points"] for r in rows),
                                                   "max": sum(r["max"] for r in rows)}, indent=1))
    else:
        sys.exit(check(only=only))
