"""sae_core: sparse autoencoders (Ng's KL, L1, TopK) as a pure library.

It depends on numpy, torch, scikit-learn, safetensors, pyarrow and matplotlib only; the
pipeline tools (prefect, mlflow, dvc) live in ``flows``. The top-level names are loaded
on first use, so that ``import sae_core.dataset`` (say) does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_core.config import SAEConfig
    from sae_core.estimator import SparseAutoencoder

__all__ = ["SAEConfig", "SparseAutoencoder"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "SAEConfig":
        from sae_core.config import SAEConfig

        return SAEConfig
    if name == "SparseAutoencoder":
        from sae_core.estimator import SparseAutoencoder

        return SparseAutoencoder
    raise AttributeError(f"module 'sae_core' has no attribute {name!r}")
