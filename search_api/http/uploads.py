"""Multipart uploads: read each file's bytes, refusing one once it passes the size limit (streamed, so
a huge upload is never held whole). Content checks (empty, format, decoding) are the service's."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import UploadFile

from search_api.service import TooLarge


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(f"upload larger than {max_bytes} bytes", code="upload-too-large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_uploads(uploads: Sequence[UploadFile] | None, max_bytes: int) -> list[bytes]:
    return [await read_upload(u, max_bytes) for u in uploads or []]
