"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
  """Bad input from the user (a file, tensor, key or flag); the message names it and what was expected."""


EXIT_USER_ERROR = 2


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
