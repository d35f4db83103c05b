"""The admin endpoints' bearer token (``POST /reload``).

With a token, an admin request must carry ``Authorization: Bearer <token>``; a missing, malformed or wrong header
is answered 401 (with ``WWW-Authenticate: Bearer``) and does nothing. The comparison takes the same time wherever
the presented token differs (:func:`hmac.compare_digest`). Without a token the admin endpoints are open, which
:func:`~fct_registry.serving.server.serve` allows on a loopback address only.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

BEARER = HTTPBearer(auto_error=False, scheme_name="adminToken",
                    description="The admin token (FCT_REGISTRY_ADMIN_TOKEN or `serve --admin-token-file`).")


def admin_guard(token: str | None) -> Callable[..., None]:
    """A FastAPI dependency that lets an admin request through only with ``token`` (any request when None).

    Raises (from the dependency):
        HTTPException: 401 when the ``Authorization`` header is missing, not ``Bearer <token>``, or holds another
            token; the detail never repeats what was sent.
    """
    expected = None if token is None else token.encode()

    def require_admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if expected is None:
            return
        if credentials is None:
            raise _unauthorized("this admin endpoint needs 'Authorization: Bearer <admin token>'; the request has none")
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise _unauthorized("the admin token sent in 'Authorization: Bearer' is wrong; expected the token "
                                "the service was started with")

    return require_admin


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
