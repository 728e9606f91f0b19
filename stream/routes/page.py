"""The browser page and what it loads: `/`, `/v1/config`, reference images, sample audio.

`/` is open (the page asks for the token); the `/v1` routes here need it like every other.
The static files are mounted by `create_app` (`/static`), since a router cannot carry a mount.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, Response

from stream.routes.deps import AUTH, SettingsDep, auth_token, error_responses

SAMPLE_AUDIO = "sample.ogg"
REFS_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "default" / "refs"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index(settings: SettingsDep) -> FileResponse:
    return FileResponse(settings.web_dir / "index.html", headers={"Cache-Control": "no-cache"})


@router.get(
    "/v1/sample-audio",
    tags=["demo"],
    dependencies=AUTH,
    response_class=FileResponse,
    responses={200: {"content": {"audio/ogg": {}}}, **error_responses(401)},
)
async def sample_audio(settings: SettingsDep) -> FileResponse:
    """A few seconds of speech for demos (`/?autostart=1&audio=/v1/sample-audio`)."""
    return FileResponse(settings.web_dir / SAMPLE_AUDIO, media_type="audio/ogg")


def shipped_references() -> dict[str, Path]:
    """The default model's sample reference images by file name (none when not shipped)."""
    if not REFS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(REFS_DIR.glob("*.png"))}


@router.get("/v1/references", tags=["demo"], dependencies=AUTH, responses=error_responses(401))
async def list_references() -> list[dict[str, str]]:
    """Sample reference images shipped with the default model, for the page to offer."""
    return [{"name": n, "url": f"/v1/references/{n}"} for n in shipped_references()]


@router.get(
    "/v1/references/{name}",
    tags=["demo"],
    dependencies=AUTH,
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **error_responses(401, 404)},
)
async def get_reference(name: str, request: Request) -> Response:
    """A shipped reference image; `default` is the one sessions without an image get."""
    if name == "default":
        return Response(
            await asyncio.to_thread(_png, request.app.state.default_reference),
            media_type="image/png",
        )
    path = shipped_references().get(name)
    if path is None:
        raise HTTPException(404, f"no shipped reference image named {name!r}")
    return FileResponse(path, media_type="image/png")


@router.get("/v1/config", tags=["sessions"], dependencies=AUTH, responses=error_responses(401))
async def client_config(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """What a client needs before it starts: whether a token is needed, the model's shape."""
    info = request.app.state.executor.info
    return {
        "auth_required": auth_token(settings) is not None,
        "model": info.name,
        "width": info.width,
        "height": info.height,
        "fps": info.fps,
        "audio_sample_rate": info.audio_sample_rate,
        "frames_per_block": info.frames_per_block,
        "steps": info.steps,
        "max_message_bytes": settings.max_message_bytes,
    }


def _png(image: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
