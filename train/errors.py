"""The mistakes a user can fix: a bad flag or config value, a missing or corrupt file, runs
that do not go together. Commands print them in one line (train/command.py).

Library code raises `UserError` where it detects bad input, with a message that
names the flag, key, file or run and says what to do. It subclasses
`ValueError`, so code and tests that expect a ValueError keep working; a
plain ValueError stays what it was: a bug, shown with its traceback.
"""


class UserError(ValueError):
  """Bad input the user can fix; the message names the flag, key, file or run and what to do."""
