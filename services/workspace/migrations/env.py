from services.kit.migrations import run_env
from services.workspace.models import metadata

run_env(metadata)
