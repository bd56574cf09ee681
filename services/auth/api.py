from services.auth.keys.endpoints import apps_router, internal_router, keys_router
from services.auth.tokens.endpoints import jwks_router
from services.auth.tokens.endpoints import router as tokens_router
from services.auth.users.endpoints import router as users_router

routers = [users_router, tokens_router, jwks_router, apps_router, keys_router, internal_router]
