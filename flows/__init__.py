"""saeflow's pipeline layer: thin Prefect flows and the ``saeflow`` command line.

Only this package talks to prefect, mlflow and dvc; the maths lives in ``sae_core``.
"""

import os as _os

# No saeflow process may start Prefect's temporary per-process server: Prefect reads its
# settings once, when it is imported, so the switch is set here, before any module of this
# package can import it (flows.servers.use_prefect then supplies the API URL).
_os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")
