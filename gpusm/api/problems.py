"""Problem details (RFC 9457) that the API raises itself: bad host, bad token, recovering…

gpusm errors become problem documents through the one table in :mod:`gpusm.wire`
(:func:`~gpusm.wire.problem_for_error`); :class:`HttpProblem` is for the refusals
that are not gpusm errors. Its status and title come from the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from gpusm.wire import PROBLEM_MEDIA_TYPE, PROBLEMS, problem_body

__all__ = ["HttpProblem", "problem_response"]


def problem_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """A problem document as an ``application/problem+json`` response."""
    return JSONResponse(
        dict(body), status_code=status, headers=dict(headers or {}), media_type=PROBLEM_MEDIA_TYPE
    )


class HttpProblem(Exception):
    """An HTTP-level refusal of type ``slug`` (a key of :data:`gpusm.wire.PROBLEMS`)."""

    def __init__(
        self,
        slug: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.status = PROBLEMS[slug].status
        self.slug = slug
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra
        super().__init__(detail)

    def body(self) -> dict[str, Any]:
        """The problem document."""
        return problem_body(self.slug, self.detail, self.extra)
