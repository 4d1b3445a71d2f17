"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or missing resource; the message names the problem and the fix."""


class WriteError(UserError):
    """A file could not be written (full disk, read-only folder); what was there before is intact."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line (with its first detail if the line only introduces it)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
