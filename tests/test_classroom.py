"""classroom make: the student copy keeps every signature and docstring, and holds no solution text anywhere."""
import json
from pathlib import Path

from classroom.cli import ROOT, find_region, make_student_copy
from classroom.exercises import EXERCISES


def solution_lines(exercise) -> list[str]:
    lines = (ROOT / exercise.file).read_text().split("\n")
    begin, end = find_region(lines, exercise.function)
    inside, outside = False, set()  # boilerplate the reference also shows outside every region is no answer
    for line in lines:
        inside = (inside or line.strip() == "# BEGIN SOLUTION") and line.strip() != "# END SOLUTION"
        if not inside:
            outside.add(line.strip())
    return [l.strip() for l in lines[begin + 1:end]
            if len(l.strip()) > 12 and not l.strip().startswith("#") and l.strip() not in outside]


def source(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources and outputs one after another, as a reader sees them."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) + json.dumps(c.get("outputs", [])) for c in cells)


def test_student_copy_has_no_solutions(tmp_path):
    make_student_copy(tmp_path)
    texts = {p: source(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert not [p for p in tmp_path.rglob("*") if p.name in ("__pycache__", ".git") or p.suffix == ".pyc"]
    assert not (tmp_path / "classroom").exists()  # the answers and the mutants stay with the teacher
    for exercise in EXERCISES:
        stub = f'raise NotImplementedError("exercise {exercise.id}: '
        assert stub in texts[tmp_path / exercise.file], exercise.id
        for line in solution_lines(exercise):
            leaks = [p.name for p, text in texts.items() if line in text]
            assert leaks == [], f"{exercise.id}: `{line}` is still in {leaks}"
    marker_lines = [p.name for p, text in texts.items()
                    if any(line.strip() in ("# BEGIN SOLUTION", "# END SOLUTION") for line in text.split("\n"))]
    assert marker_lines == []


def test_every_exercise_names_tests_that_exist():
    for exercise in EXERCISES:
        for test in exercise.tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).exists() and f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), test
