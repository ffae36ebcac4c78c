"""Integer arithmetic every layer shares."""


def cdiv(a: int, b: int) -> int:
    """a / b rounded up (b > 0): how many blocks of b hold a items."""
    return -(-a // b)
