"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable


class UserError(Exception):
  """Bad input from the user (a file, tensor, key or flag); the message names it and what was expected."""


EXIT_USER_ERROR = 2


def json_number(value, integer: bool, name: str) -> int | float:
  """A value read from JSON as a number (an integer when `integer`: 3.0 is taken, 2.5 is not), else a UserError
  naming it (`name`: the file and key, or the field)."""
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or (integer and value != int(value))):
    raise UserError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
  return int(value) if integer else float(value)


def cli_main(main: Callable[[], int | None]) -> Callable[[], None]:
  """Wraps a CLI entry point: a UserError prints `error: ...` on stderr and exits 2."""

  @functools.wraps(main)
  def wrapper() -> None:
    try:
      code = main()
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr)
      sys.exit(130)
    sys.exit(code or 0)

  return wrapper
