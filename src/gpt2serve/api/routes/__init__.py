"""HTTP route modules; each exposes `router` (an APIRouter)."""
