from services.enhancement.endpoints import router

routers = [router]
