"""A background reader: items restored one ahead (or `ahead` ahead) of the caller, in order."""

import queue
import threading


class Prefetcher:
  """Yields `(ingredient, restore_fn(ingredient))` in order, reading ahead on a background thread.

  Reading starts when the Prefetcher is made, so the caller's own set-up (a
  compile) overlaps the first reads; afterwards the read of ingredient i+1
  overlaps the caller's work on ingredient i. Memory stays flat in N: the
  caller must be done with an ingredient (its references dropped, its
  computations finished) when it asks for the next one, and at most `ahead`
  ingredients are read beyond the one it holds. A failed read is raised on
  the caller's thread when it reaches that ingredient, as `restore` raised it
  (naming the ingredient); nothing after it is read. Use it as a context
  manager, or call `close()`, so a caller that stops early stops the reader.
  """

  def __init__(self, ingredients, restore_fn, ahead=1):
    if ahead < 1:
      raise ValueError(f"ahead={ahead}: read at least one ingredient ahead")
    self._ingredients = list(ingredients)
    self._restore = restore_fn
    self._slots = threading.Semaphore(ahead + 1)  # The caller's ingredient and `ahead` more.
    self._ready = queue.Queue()
    self._closed = threading.Event()
    self._taken = 0
    self._thread = threading.Thread(target=self._read_all, name="soup-prefetch", daemon=True)
    self._thread.start()

  def _read_all(self):
    for ingredient in self._ingredients:
      self._slots.acquire()
      if self._closed.is_set():
        return
      try:
        tree = self._restore(ingredient)
      except BaseException as e:  # pylint: disable=broad-except  Raised on the caller's thread.
        self._ready.put((ingredient, None, e))
        return
      self._ready.put((ingredient, tree, None))
      del tree

  def __iter__(self):
    return self

  def __next__(self):
    if self._taken:
      self._slots.release()  # The caller is done with the previous ingredient.
    if self._taken == len(self._ingredients) or self._closed.is_set():
      raise StopIteration
    ingredient, tree, error = self._ready.get()
    self._taken += 1
    if error is not None:
      self.close()
      raise error
    return ingredient, tree

  def close(self):
    """Stops reading ahead and waits for a read in progress to end."""
    self._closed.set()
    self._slots.release()  # Wakes a reader waiting for a slot.
    self._thread.join()
    while not self._ready.empty():
      self._ready.get_nowait()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
