"""DrNet (Denton & Birodkar 2017): content and pose encoders, decoder, scene discriminator and
pose LSTM (`model.py`)."""
