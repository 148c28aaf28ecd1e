"""Error classes, at the bottom of the package: every stage raises these and the CLI catches `CgfFheError`.

Each is a one-line, user-facing message (exit code 2 on the command line); none of them imports anything from the
package, so any module may raise them without an import circle.
"""
from __future__ import annotations


class CgfFheError(Exception):
    """Base class of every error the command line prints as one line (exit code 2)."""


class UserError(CgfFheError):
    """An error caused by the user's input (flags, files, settings)."""


class DataError(CgfFheError, RuntimeError):
    """MRPC cannot be found or parsed; the message names every source tried."""


class CheckpointError(CgfFheError, RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt; the message names the file."""


class GraphError(CgfFheError, ValueError):
    """The file is not a readable ONNX model, or names inputs that do not exist."""


class OutputError(UserError):
    """An output path cannot be written (a directory where a file is wanted, no permission, disk full, locked by
    another run, or it would overwrite an input); the message names the path."""


class ModelNameError(UserError):
    """``--model`` names neither a built-in model, a model folder, a checkpoint nor a loadable hub model."""


class SimulationError(UserError):
    """Encrypted evaluation failed for a reason the user can act on (names the node when known); the simulate
    stage's backends and packing raise it (re-exported by cgf_fhe.simulate.backends.base)."""
