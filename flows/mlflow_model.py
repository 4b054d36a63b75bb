"""The MLflow pyfunc of a saeflow model, defined from code (MLflow "models from code"), so
that logging it pickles nothing and loading it unpickles nothing.

``mlflow.pyfunc.load_model(uri).predict(X)`` returns the hidden activations of X
(n_samples, n_features) in [0, 1] as (n_samples, n_components).
"""

import mlflow.pyfunc
from mlflow.models import set_model


class SparseAutoencoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from sae_core import SparseAutoencoder

        self.sae = SparseAutoencoder.load(context.artifacts["sae"])

    def predict(self, context, model_input, params=None):
        import numpy as np

        return self.sae.transform(np.asarray(model_input, dtype=np.float64))


set_model(SparseAutoencoderModel())
