"""What the first process of a multi-process server tells the others (`infer.py --serve` over jax.distributed).

Every process runs the same engine (server.py) and so the same generate calls, whose device programs span all their
devices; only process 0 serves HTTP, so only it knows which requests came and which clients left. At each of the
engine's sync points it sends what it saw since the last as one message, and the others wait for it there, so every
process takes the same decisions in the same order.

Messages go through jax.distributed's key-value store (its coordination service, in process 0): message n is JSON
text under PREFIX/<n // BLOCK>/<n>. Every BLOCK messages a follower records how many it has read
(PREFIX/read/<process>), and process 0 deletes the blocks that every follower has read.

Only process 0 can stop the server (its engine tells the others at a sync point); another process asked to stop (a
SIGTERM, as a scheduler sends every process at once) asks process 0 to, under PREFIX/stop.
"""

from __future__ import annotations

import json

import jax

PREFIX = "qwen_moe_jax/serve"
BLOCK = 64
WAIT_MS = 1_000  # a follower's wait for the next message, renewed while the server is idle (short: the process's
# signal handlers run between two waits)


class Link:
  """Process 0 `send`s, the others `receive` (each a message in order)."""

  def __init__(self):
    from jax._src import distributed  # the key-value store's client (as Orbax reaches it too)

    self.client = distributed.global_state.client
    self.leads, self.followers = jax.process_index() == 0, jax.process_count() - 1
    self.count = 0  # messages sent (process 0) or read
    self.kept = 0  # process 0: the first block not yet deleted

  def _key(self, n: int) -> str:
    return f"{PREFIX}/{n // BLOCK}/{n}"

  def send(self, message: dict) -> None:
    self.client.key_value_set(self._key(self.count), json.dumps(message))
    self.count += 1
    if self.count % BLOCK == 0:
      read = [int(n) for _, n in self.client.key_value_dir_get(f"{PREFIX}/read/")]
      done = min(read) // BLOCK if len(read) == self.followers else 0  # blocks every follower has read
      for block in range(self.kept, done):
        self.client.key_value_delete(f"{PREFIX}/{block}")
      self.kept = max(self.kept, done)

  def receive(self) -> dict:
    text = self._wait(self._key(self.count))
    self.count += 1
    if self.count % BLOCK == 0:
      self.client.key_value_set(f"{PREFIX}/read/{jax.process_index()}", str(self.count), allow_overwrite=True)
    return json.loads(text)

  def ask_to_stop(self) -> None:
    """(A follower) asks process 0 to stop the server."""
    self.client.key_value_set(f"{PREFIX}/stop", str(jax.process_index()), allow_overwrite=True)

  def wait_for_stop_request(self) -> int:
    """(Process 0) waits until a follower asks to stop the server; returns its process index."""
    return int(self._wait(f"{PREFIX}/stop"))

  def _wait(self, key: str) -> str:
    while True:
      try:
        return self.client.blocking_key_value_get(key, WAIT_MS)
      except jax.errors.JaxRuntimeError as e:  # (if process 0 is gone, jax's distributed service ends this one)
        if "DEADLINE_EXCEEDED" not in str(e):
          raise
