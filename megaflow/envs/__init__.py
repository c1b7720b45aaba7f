"""Task families and their environments: SWE repository tasks (`swe`, `repos`),
preparing a sandbox for a task (`prepare`), grading (`grading`, `pristine`) and the
pytest-free test runner (`runtests`). Task-set validation, which runs the oracle agent
over a task file, sits above them in `megaflow.validate`.

Terminal tasks need nothing beyond the sandbox: their check script is the evaluation.
"""
