"""One short, loggable description of an exception, for logs and error bodies."""


def describe(error: BaseException, limit: int = 200) -> str:
    """Type and the first line of the message, cut to ``limit``: enough to act on, without
    the request data (and so the secrets) a long message may repeat."""
    text = str(error).splitlines()[0][:limit] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
