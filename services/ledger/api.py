from services.ledger.endpoints import router as ledger_router

routers = [ledger_router]
