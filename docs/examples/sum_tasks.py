"""A worked example of a task family: generated arithmetic tasks in the terminal shape.

A task family is a source of task records. This one yields `TerminalTask`s (an
instruction, files, a check script whose exit code is the reward, a gold solution
for the oracle agent), so the whole platform runs them unchanged: put them in a
`RunSpec`, or write them to a YAML file and name it as ``tasks_file``.
`tests/test_docs_examples.py` checks that every generated task earns 1 with its
solution and 0 without, graded by MegaFlow's own `grading.evaluate_task`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from megaflow.spec import TerminalTask


def sum_tasks(n: int, seed: int = 0) -> Iterator[TerminalTask]:
    """Yield `n` tasks "add the numbers in numbers.txt"; the same seed gives the same tasks.

    Args:
        n: How many tasks.
        seed: Seeds the numbers, so that a task set can be rebuilt exactly.
    """
    rng = random.Random(seed)
    for i in range(n):
        numbers = [rng.randint(1, 999) for _ in range(rng.randint(2, 6))]
        yield TerminalTask(
            instance_id=f"sum-{seed}-{i}",
            instruction="Write the sum of the numbers in numbers.txt (one per line) into answer.txt.",
            files={"numbers.txt": "".join(f"{x}\n" for x in numbers)},
            # The check compares with the right answer, which the agent never sees.
            check=f'test "$(cat answer.txt)" = "{sum(numbers)}"',
            solution=["echo $(( $(paste -sd+ numbers.txt) )) > answer.txt"],
        )
