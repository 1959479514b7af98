"""Stage 3b, masked-autoencoder pretraining: a second task of the training stage's loop, and its figures."""
