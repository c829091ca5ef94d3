"""What wraps every route: the request-body limit and the 422 answer for a body that does not validate."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, before any parsing (declared or streamed size)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        body = (b'{"detail":"request body larger than %d bytes (max_body_bytes); send smaller batches"}'
                % self.limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def printable(value: object) -> str | int:
    """A location or message part as JSON can carry it (lone surrogates escaped)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field. The offending input is not echoed: NaN, 1e400 or a lone surrogate
    cannot be encoded as JSON, and a response that fails to encode closes the connection with no answer."""
    errors = [{"type": str(e.get("type", "")), "loc": [printable(part) for part in e.get("loc", ())],
               "msg": printable(e.get("msg", ""))} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(map(str, first.get("loc", [])))
    return JSONResponse(status_code=422, content={"detail": errors, "message": f"{where}: {first.get('msg')}"})
