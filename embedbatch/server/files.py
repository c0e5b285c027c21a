"""The Files endpoints of ``embedbatch serve``."""

from __future__ import annotations

import secrets

from aiohttp import BodyPartReader, web

from embedbatch.server.state import MAX_FILE_BYTES, ServerState, error_response, json_response


class FilesMixin(ServerState):
    """``/v1/files``: upload (multipart), list (paged), retrieve, delete, content."""

    # ---- files ------------------------------------------------------------------------------
    async def create_file(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        purpose = None
        filename = "upload.jsonl"
        expires_s: int | None = None
        tmp = self.root / f".{secrets.token_hex(6)}.upload"
        got_file = False
        size = 0
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "expires_after[seconds]":
                expires_s = int((await part.text()).strip())
            elif part.name == "file":
                got_file = True
                filename = part.filename or filename
                with open(tmp, "wb") as fh:
                    while chunk := await part.read_chunk(1 << 20):
                        size += len(chunk)
                        if size > MAX_FILE_BYTES:
                            fh.close()
                            tmp.unlink(missing_ok=True)
                            return error_response(400, f"File exceeds the maximum size of {MAX_FILE_BYTES} bytes.")
                        fh.write(chunk)
        if not got_file:
            return error_response(400, "Missing required parameter: 'file'.")
        if purpose not in {"batch", "batch_output", "assistants", "fine-tune", "user_data"}:
            tmp.unlink(missing_ok=True)
            return error_response(400, f"Invalid value for 'purpose': {purpose!r}.")
        stored = self._store(tmp, filename, purpose)
        if expires_s is not None:
            stored.expires_at = stored.created_at + expires_s
        return json_response(stored.obj())

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        items = sorted(self.files.values(), key=lambda f: (f.created_at, f.id), reverse=True)
        if purpose:
            items = [f for f in items if f.purpose == purpose]
        return json_response(self._page(request, [f.obj() for f in items], default_limit=10_000))

    async def get_file(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return error_response(404, "No such File object", code="not_found")
        return json_response(f.obj())

    async def delete_file(self, request: web.Request) -> web.Response:
        f = self.files.pop(request.match_info["file_id"], None)
        if f is None:
            return error_response(404, "No such File object", code="not_found")
        f.path.unlink(missing_ok=True)
        return json_response({"id": f.id, "object": "file", "deleted": True})

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return error_response(404, "No such File object", code="not_found")
        if self.faults.cut_downloads > 0:
            self.faults.cut_downloads -= 1
            data = f.path.read_bytes()
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()  # the client sees a body cut short
            return resp
        return web.FileResponse(f.path, headers={"Content-Type": "application/octet-stream"})
