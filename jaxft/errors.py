"""The one exception type jaxft raises for bad input.

Its message is a single line that names the file / key / value and the cause; the CLI prints it
without a traceback and exits with status 2.
"""


class JaxftError(Exception):
    """Bad input: a missing file, an unsupported config value, a damaged checkpoint..."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says at which step and which checkpoint holds it (one line). The CLI
    prints it and exits with status 130, as for any Ctrl-C. A KeyboardInterrupt, so that code which cleans up
    on Ctrl-C cleans up on this too."""
