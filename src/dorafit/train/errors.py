"""How the training commands report bad input: one line, ``error: <what is wrong and how to fix it>``, exit code 2.

Every expected failure (unknown preset, missing file, malformed data, bad option, damaged checkpoint) is raised
as a ValueError (or OSError for the file system) with a message written for the user. Set DORAFIT_DEBUG=1 to
see the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from ..files import io_error


def report_errors(command: Callable[[], int]) -> int:
    if os.environ.get("DORAFIT_DEBUG") == "1":
        return command()
    try:
        return command()
    except ModuleNotFoundError as exc:  # a training dependency is not installed
        print(f"error: the Python package {exc.name!r} is missing; install the training extras with: "
              "pip install 'dorafit[train]'", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {io_error(exc, exc.filename or 'a file', 'use')}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
