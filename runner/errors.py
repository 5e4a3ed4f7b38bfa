"""The one error type for mistakes a user can fix in a recipe, a command line or their data."""


class RecipeError(Exception):
    """A user mistake, reported as one line: ``error: <key.path>: <problem> (<hint>)``."""

    def __init__(self, key_path: str, problem: str, hint: str | None = None):
        self.key_path = key_path
        self.problem = problem
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.key_path}: " if self.key_path else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"error: {where}{self.problem}{hint}"
