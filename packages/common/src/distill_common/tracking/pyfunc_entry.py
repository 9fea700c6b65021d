"""MLflow "model from code" entry: the pyfunc class is referenced by this file, not pickled."""

import mlflow.models

from distill_common.tracking.pyfunc import GeneratorPyfunc

mlflow.models.set_model(GeneratorPyfunc())
