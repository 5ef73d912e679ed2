"""Bearer-token guard of the admin API. With no token configured the admin API is off (403), never open."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gramrec.service.deps import get_settings
from gramrec.service.settings import ServiceSettings

bearer = HTTPBearer(auto_error=False, description="the GRAMREC_ADMIN_TOKEN value")


async def require_admin(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    settings: Annotated[ServiceSettings, Depends(get_settings)],
) -> None:
    if settings.admin_token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="admin API disabled: set GRAMREC_ADMIN_TOKEN to enable it"
        )
    expected = settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    # compare_digest takes the same time wherever the first differing byte is, so timing reveals nothing.
    if credentials is None or not secrets.compare_digest(given, expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid admin bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
