"""A reverse Polish notation calculator."""

import operator

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def evaluate(expression: str) -> float:
    """Evaluate a space-separated RPN expression."""
    stack = []
    for token in expression.split():
        if token in _OPS:
            if len(stack) < 2:
                raise ValueError(f"not enough operands for {token}")
            a = stack.pop()
            b = stack.pop()
            stack.append(_OPS[token](a, b))
        else:
            stack.append(float(token))
    if len(stack) != 1:
        raise ValueError("malformed expression")
    return stack[0]
