"""Where qwen-moe-jax keeps what it caches by default (compiled programs, grammars). No jax here: the grammar
build's child process imports it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home(kind: str) -> Path:
  """~/.cache/qwen-moe-jax/<kind>, under $XDG_CACHE_HOME instead of ~/.cache when that is set (XDG's base
  directories); not created here."""
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-moe-jax" / kind
