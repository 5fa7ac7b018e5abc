"""The error type for problems a user can fix."""


class LitEmbedError(Exception):
    """Bad input or an unusable setting; the message names the file, line or id and says what to do.

    The command-line apps print it without a traceback and exit with status 2.
    """
