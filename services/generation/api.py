from services.generation.endpoints import router as generation_router
from services.generation.openai_compat import router as openai_router

routers = [generation_router, openai_router]
