"""The one base class for errors a user can cause (bad input, bad config); the CLI prints them as one line."""


class KdepError(Exception):
    """A user-facing error: the message names the file, shard or key and says what to do."""
