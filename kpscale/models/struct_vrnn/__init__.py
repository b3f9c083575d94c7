"""Struct-VRNN (Minderer et al. 2019): the model (`model.py`) and its training configs (`configs/`)."""
