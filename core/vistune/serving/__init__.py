"""The OpenAI-compatible server (``vistune serve``): FastAPI application, request
schemas, image loading policy and admission limits.  Needs the ``serve`` extra
(fastapi, uvicorn, httpx); nothing here is imported until a server is built."""
