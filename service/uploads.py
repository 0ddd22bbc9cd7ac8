"""The images of a score request: the file parts of a multipart body, or one raw image body.

A raw body is taken as an image when it says so (``image/*``), says only that it is bytes
(``application/octet-stream``), or says nothing: what camera SDKs, ``requests.post(url, data=...)`` and
most load tools send (ApacheBench's default ``text/plain`` is refused, with the flag to add). The
decoder tells the format from the bytes anyway, and refuses what is no image (``not_an_image``); a body
that declares another type (JSON, text, a form) is a client using the wrong API and gets 415 with what
to send instead.

Starlette reports multipart limits and syntax errors as ``HTTPException``; here they become the service's
own error codes (``too_many_files``, ``bad_multipart``), so clients branch on one JSON shape. A client
that disconnects mid-upload (or is cut off by the server's body timeout) becomes ``client_closed`` (499).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from mnemo.service.errors import ApiError


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


RAW_IMAGE_TYPES = frozenset({"", "application/octet-stream"})  # besides image/*


async def read_uploads(request: Request, max_files: int) -> list[Upload]:
    """Every image of the request, in order; at most ``max_files`` file parts."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = media.startswith("image/") or media in RAW_IMAGE_TYPES
    if not (raw or media == "multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"got {media}; send multipart/form-data, image/* or application/octet-stream (curl -F "
            "file=@IMAGE, or a raw body typed image/png: curl -H 'Content-Type: image/png', ab -T image/png)",
        )
    try:
        if raw:
            return [Upload(None, await request.body())]
        return await _read_multipart(request, max_files)
    except ClientDisconnect:
        raise ApiError(499, "client_closed", "the client disconnected during the upload") from None


async def _read_multipart(request: Request, max_files: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_files, max_fields=32)
    except HTTPException as exc:
        code = "too_many_files" if "Too many files" in str(exc.detail) else "bad_multipart"
        raise ApiError(400, code, str(exc.detail)) from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise ApiError(400, "no_image", "the multipart body has no file part")
        return [Upload(f.filename, await f.read()) for f in files]
    finally:
        await form.close()
