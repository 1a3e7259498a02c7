"""The HTTP server: FastAPI app, SageMaker routes, errors, middleware."""
