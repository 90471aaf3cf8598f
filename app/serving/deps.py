"""The inference service as a request dependency (made once per process in the lifespan)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.serving.service import InferenceService


async def get_inference(request: Request) -> InferenceService:
    return request.app.state.inference  # type: ignore[no-any-return]


InferenceDep = Annotated[InferenceService, Depends(get_inference)]
