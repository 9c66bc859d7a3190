"""The one base class of errors a user can act on.

Each module raises its own subclass (a bad cohort file, a stage not finished, a store out
of reach...) with a message that says what to do; the CLI catches this base class and
prints the message as one line with exit code 2, without importing the modules that
raise them (some load torch or scikit-learn).
"""


class UserError(Exception):
    """An error whose message tells the user what to do."""
