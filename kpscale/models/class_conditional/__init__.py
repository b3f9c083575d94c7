"""Kim et al. 2019: detector, image translator with a background mask, patch discriminator,
class-conditional VAE over keypoint sequences and its LSTM discriminator (`model.py`)."""
