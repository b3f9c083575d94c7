"""CNN-VRNN, Struct-VRNN's unstructured baseline: the model (`model.py`) and its training configs (`configs/`)."""
