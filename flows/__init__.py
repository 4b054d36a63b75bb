"""saeflow's pipeline layer: thin Prefect flows and the ``saeflow`` command line.

Only this package talks to prefect, mlflow and dvc; the maths lives in ``sae_core``.
"""
