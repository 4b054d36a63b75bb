"""sae_core: sparse autoencoders (Ng's KL, L1, TopK) as a pure library.

It depends on numpy, torch, scikit-learn, safetensors and matplotlib only; the
pipeline tools (prefect, mlflow, dvc) live in ``flows``.
"""

from sae_core.config import SAEConfig
from sae_core.estimator import SparseAutoencoder

__all__ = ["SAEConfig", "SparseAutoencoder"]
__version__ = "0.1.0"
