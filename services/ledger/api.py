from services.ledger.admin import router as admin_router
from services.ledger.allowances import router as allowances_router
from services.ledger.billing.endpoints import router as billing_router
from services.ledger.endpoints import router as ledger_router

routers = [ledger_router, allowances_router, billing_router, admin_router]
