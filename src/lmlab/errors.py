"""The one exception type for user mistakes: the CLI prints it as one line and exits non-zero."""

from __future__ import annotations


class LmlabError(Exception):
    """A user-facing error: what is wrong, where (file, line, field) and how to fix it."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message, self.file, self.line, self.field, self.hint = message, file, line, field, hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = str(self.file) + (f":{self.line}" if self.line else "") + ": "
        field = f"{self.field}: " if self.field else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"{where}{field}{self.message}{hint}"
