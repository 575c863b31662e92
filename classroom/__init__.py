"""Classroom mode: exercises cut from the reference code and graded by the project's own tests.

An exercise is a region of a script (or of a notebook's code cell) between a line `# BEGIN SOLUTION` and a line
`# END SOLUTION` (nbgrader's convention), inside a function whose signature and docstring say what to write.
`python -m classroom list | make DIR | grade DIR | check` — see classroom/cli.py and classroom/COURSE.md.
"""
