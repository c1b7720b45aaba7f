from csvmini.parse import split_row

__all__ = ["split_row"]
