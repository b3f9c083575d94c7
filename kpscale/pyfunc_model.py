"""A trained kpscale model as an MLflow pyfunc model, logged from this file (MLflow's models
from code: nothing is pickled). Its artifacts are the run's weights.pt and config.yaml;
`predict` samples futures of clips:

    model = mlflow.pyfunc.load_model("runs:/RUN_ID/model")        # or models:/NAME/VERSION
    frames = model.predict(video, params={"future": 10, "samples": 3})

video: float32 [B, T, C, H, W] in [0, 1], its first `observed` frames (model.observed unless
given) conditioning; frames: float32 [B, S, observed + future, C, H, W]."""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class TrainedModel(PythonModel):
    def load_context(self, context) -> None:
        from kpscale.models import build_family
        from kpscale.train.config import load_train_config

        self.cfg = load_train_config(context.artifacts["config"], [])
        family = build_family(self.cfg.model)
        family.root.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model = family.predictor().eval()

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = params or {}
        video = torch.from_numpy(np.asarray(model_input, np.float32))
        _, frames = self.model.sample_future(video, int(params.get("future", self.cfg.model.predicted)),
                                             int(params.get("samples", 1)), params.get("observed"))
        return frames.numpy()


mlflow.models.set_model(TrainedModel())
