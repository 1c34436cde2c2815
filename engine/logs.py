"""What a log line may hold of a name it did not choose (a model's file or folder, a LoRA, a request's path or
refusal): the name escaped onto one line of printable characters, so that a name holding a newline or a terminal's
escape codes can neither forge a line of its own nor colour the terminal. The access log (api/guard.py) and every
line that names a file or a model use it. And a URL as a log line or an error may show it: without its password.
"""

import urllib.parse

# Escaped as in a quoted string: the marks around a name in the access log, and the mark that starts an escape.
QUOTED = {'"': '\\"', "\\": "\\\\"}


def escaped(text) -> str:
    """`text` with each character Python does not print (newlines, ESC and the other control characters, line
    separators) written as its escape, and each double quote and backslash escaped: 'tiny\\nINFO' for a name
    holding a newline."""
    return "".join(QUOTED.get(char) or shown(char) for char in str(text))


def shown(char: str) -> str:
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def shown_url(url: str) -> str:
    """The URL as logs and errors show it (--queue's Redis): with its password, if it has one, left out."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
