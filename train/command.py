"""How every stockpot command runs: `command.run(main)`, in place of `absl.app.run(main)`.

One error path for every command:

- A user mistake ends the command with one line on stderr, `FATAL <message>`,
  and exit status 2 (`EXIT_USER_ERROR`). The message names the flag, key, file
  or run and what to do. User mistakes are `USER_ERRORS`:
  - `errors.UserError`, raised where the library detects bad input;
  - absl's flag errors (`flags.Error`): an unknown flag, a bad flag value, an
    override of the wrong type (`--config.lr=abc`), and what a config file
    raises while it builds the config (its ValueError for a bad argument,
    `--config=file.py:varient=x`; ml_collections wraps ValueError and TypeError
    into the flag's error with their traceback, printed here as the innermost
    error's message only: `--traceback` shows where);
  - an override of a key the locked config lacks (`--config.optimizer.momentun=0.5`:
    ml_collections raises KeyError or AttributeError, named here with its suggestion);
  - a config file that does not exist or cannot be read;
  - `app.UsageError` (flags that do not go together);
  - the OS's errors about a path: it does not exist, is a directory or is not one,
    or may not be read or written (`PATH_ERRORS`).
- A collective that fails because another process of a multi-process job is
  gone (killed, crashed, preempted) ends the command with one FATAL line and
  exit status 3 (`EXIT_LOST_PROCESS`), at once: re-running the command on every
  host resumes. A process blocked on a lost peer outside a collective is
  ended by JAX after `--heartbeat_timeout` seconds (train/distributed.py).
- Anything else is a bug and keeps Python's traceback and exit status 1.
- `--traceback` prints a user mistake's traceback too, before its FATAL line.

Library logs stay off the console: `--verbosity` defaults to -1 (WARNING) for
absl, JAX, TensorFlow, TFDS and orbax, where `absl.app.run` would raise it to
INFO; `--verbosity=0` brings their INFO lines back, `--verbosity=1` DEBUG.
stockpot's own progress lines (`[train] ...`, `[soups] ...`) are printed, and
always show. TensorFlow's C++ start-up lines are train/tf_setup.py's.
"""

import functools
import os
import re
import sys
import traceback

from absl import app
from absl import flags

# is_config_flag is documented for users but not exported by config_flags/__init__.py.
from ml_collections.config_flags import config_flags

from train import errors

EXIT_USER_ERROR = 2
EXIT_LOST_PROCESS = 3  # Another process of a multi-process job died: re-run on every host.
# What XLA's CPU (Gloo) collectives and JAX's coordination service say when a peer is gone.
_LOST_PROCESS = re.compile(r"gloo|heartbeat|unhealthy|connection reset|connection refused",
                           re.IGNORECASE)
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
USER_ERRORS = (errors.UserError, flags.Error, app.UsageError, *PATH_ERRORS)
# absl's verbosity of logging.WARNING (0 is INFO).
DEFAULT_VERBOSITY = -1

# ml_collections folds a config file's traceback into the message after this.
_CONFIG_FILE_ERROR = "Error whilst parsing config file:"


def run(main, flags_parser=None):
  """Parses the flags (with `flags_parser(argv)`, default absl's) and runs `main(argv)`.

  The command's error path and logs are the module docstring's.
  """
  if "traceback" not in flags.FLAGS:
    flags.DEFINE_bool("traceback", False, "Also print the traceback of a user mistake (a bad "
                      "flag, config or file); bugs always show theirs.")
  app.run(functools.partial(_run_main, main),
          flags_parser=functools.partial(_parse_flags, flags_parser or flags.FLAGS))


def _is_user_error(error):
  return isinstance(error, USER_ERRORS)


def _one_line(error):
  """The FATAL line's message of a user error: its own, on one line."""
  text = str(error)
  if isinstance(error, flags.Error) and _CONFIG_FILE_ERROR in text:
    flag = text.split(_CONFIG_FILE_ERROR)[0].rstrip().removesuffix(":")
    text = f"{flag}: {_innermost(error)}"
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _innermost(error):
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _fail(error, message, show_traceback):
  """Prints `FATAL message` (after the traceback when asked) and exits with EXIT_USER_ERROR."""
  sys.stdout.flush()
  if show_traceback:
    traceback.print_exception(error)
  sys.stderr.write(f"FATAL {message}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def _traceback_asked(argv):
  """--traceback's value before the flags are parsed (when parsing them failed)."""
  asked = False
  for arg in argv[1:]:
    if arg in ("--traceback", "--traceback=true", "--traceback=True", "--traceback=1"):
      asked = True
    elif arg in ("--notraceback", "--traceback=false", "--traceback=False", "--traceback=0"):
      asked = False
  return asked


def _config_flag_names():
  return [name for name in flags.FLAGS if config_flags.is_config_flag(flags.FLAGS[name])]


def _check_config_files(argv):
  """A `--config=<file>[:arg]` whose file does not exist, as a user error (ml_collections
  would defer it to the config's first use, as an OSError naming an internal module)."""
  names = _config_flag_names()
  for arg in argv[1:]:
    name, has_value, value = arg.removeprefix("--").partition("=")
    path = value.split(":", 1)[0]
    if arg.startswith("--") and has_value and name in names and not os.path.isfile(path):
      where = "" if os.path.isabs(path) else f" in {os.getcwd()}"
      raise errors.UserError(f"flag --{name}={value}: no config file {path}{where}")


def _check_configs_loaded():
  """A config file that failed to load (ml_collections keeps the error for its first use)."""
  for name in _config_flag_names():
    flag = flags.FLAGS[name]
    if flag.present and flag.value is not None:
      try:
        flag.value.keys()
      except OSError as e:
        raise errors.UserError(f"flag --{name}: {e.__cause__ or e}") from e


def _unknown_config_key(error, argv):
  """One line for ml_collections' KeyError or AttributeError when a `--config.a.b=v` override
  names a key the locked config lacks; None when no override names it (then it is a bug)."""
  if not isinstance(error, (KeyError, AttributeError)):
    return None
  text = str(error)
  key = re.search(r"'(\w+)", text)
  if key is None:
    return None
  key = key.group(1)
  overrides = [arg[2:].split("=")[0] for arg in argv[1:] if arg.startswith("--")]
  culprit = [o for o in overrides
             if o.split(".")[0] in _config_flag_names() and key in o.split(".")[1:]]
  if not culprit:
    return None
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  return (f"--{culprit[0]}: the config has no key {key!r}"
          + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""))


def _parse_flags(parse, argv):
  try:
    _check_config_files(argv)
    args = parse(argv)
    _check_configs_loaded()
  except Exception as e:  # pylint: disable=broad-except  # Only user errors end here.
    message = _unknown_config_key(e, argv) or (_one_line(e) if _is_user_error(e) else None)
    if message is None:
      raise
    _fail(e, f"Flags parsing error: {message}", _traceback_asked(argv))
  if flags.FLAGS["verbosity"].using_default_value:
    # Set, so that absl.app.run leaves it (it raises an unset verbosity to INFO).
    flags.FLAGS.verbosity = DEFAULT_VERBOSITY
  return args


def _run_main(main, argv):
  try:
    return main(argv)
  except USER_ERRORS as e:
    _fail(e, _one_line(e), flags.FLAGS.traceback)
  except Exception as e:  # pylint: disable=broad-except
    if not _lost_process(e):
      raise
    sys.stdout.flush()
    if flags.FLAGS.traceback:
      traceback.print_exception(e)
    sys.stderr.write(f"FATAL another process of this multi-process job is gone (killed, "
                     f"crashed or preempted): {_one_line(e)[:300]}; start the same command on "
                     "every host again: it resumes\n")
    sys.stderr.flush()
    # Not sys.exit: JAX's shutdown at exit would wait for the lost process at a barrier
    # (--heartbeat_timeout), then abort.
    os._exit(EXIT_LOST_PROCESS)  # pylint: disable=protected-access


def _lost_process(error):
  """Whether `error`, raised by a collective of a multi-process job, says a peer is gone."""
  jax = sys.modules.get("jax")
  return (jax is not None and isinstance(error, jax.errors.JaxRuntimeError)
          and jax.process_count() > 1 and _LOST_PROCESS.search(str(error)) is not None)

