"""The one exception type jaxft raises for bad input.

Its message is a single line that names the file / key / value and the cause; the CLI prints it
without a traceback and exits with status 2.
"""


class JaxftError(Exception):
    """Bad input: a missing file, an unsupported config value, a damaged checkpoint..."""
