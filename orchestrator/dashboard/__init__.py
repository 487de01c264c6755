"""The run's web dashboard: a JSON API (FastAPI, OpenAPI at /openapi.json) and two pages, served by
uvicorn on a thread of the Orchestrator actor. See docs/dashboard.md."""
