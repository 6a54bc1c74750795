"""The shared secret of a kvtier service (server, controller): from a token file or the environment."""

from __future__ import annotations

import os
from pathlib import Path


def read_token(env_var: str, token_file: str | None) -> str:
    """The token in `token_file` if given (ValueError if it is empty), else `$env_var` ("" if unset)."""
    if not token_file:
        return os.environ.get(env_var, "")
    token = Path(token_file).expanduser().read_text().strip()
    if not token:
        raise ValueError(f"--token-file {token_file} is empty")
    return token
