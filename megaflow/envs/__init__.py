"""Task families and their environments: SWE repository tasks (`swe`, `repos`),
the pytest-free test runner (`runtests`) and task-set validation (`validate`).

Terminal tasks need nothing beyond the sandbox: their check script is the evaluation.
"""
