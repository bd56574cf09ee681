from services.workspace.endpoints import router as workspace_router

routers = [workspace_router]
