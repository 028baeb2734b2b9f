"""overnight: the harness (src/harness/), the research room (src/research/) and the lab (src/lab/)."""
import os as _os

# MLflow 3's telemetry thread sets and pops an environment variable (_MLFLOW_TELEMETRY_SESSION_ID) while the lab's
# threads copy os.environ for their child processes and MLflow clients read it: a bench session lost its tracking
# at start to that race ("API request ... failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'"), and with no
# network the telemetry has nowhere to go anyway. Off unless the user asked for it (MLFLOW_DISABLE_TELEMETRY=false).
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
