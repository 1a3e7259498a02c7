"""What counts as a server error in a fuzzed answer.

A 5xx can hide in a 200 or a 424: the runtime paths wrap the container's status in a 424 ModelError
(`OriginalStatusCode`), a JSON Lines answer carries one error record per line, and a stream reports a
failure after its start as an error event. `server_error` looks for all of these.
"""

from __future__ import annotations

import re

_ORIGINAL_5XX = re.compile(r'"OriginalStatusCode":\s*5\d\d')


def server_error(status: int, text: str) -> bool:
    """True when the answer is, or carries, a 5xx."""
    return (
        status >= 500
        or bool(_ORIGINAL_5XX.search(text))
        or "internal server error" in text
        or '"server_error"' in text
    )

