"""The serving stack: controller, model worker, demo, CLI and launcher (``pip install -e ".[serve]"``)."""
from llava.extras import check_extra

check_extra("serve", "llava.serve", ("anyio", "fastapi", "uvicorn", "httpx", "pydantic"))
