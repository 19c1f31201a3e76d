"""The OpenAI-compatible HTTP API: schemas, chat templates, the engine seam and the FastAPI app."""

from expertmesh.api.chat_template import ChatTemplate
from expertmesh.api.engine_client import EngineClient, LocalEngineClient, ModelInfo
from expertmesh.api.openai_app import build_openai_app

__all__ = ["ChatTemplate", "EngineClient", "LocalEngineClient", "ModelInfo", "build_openai_app"]
