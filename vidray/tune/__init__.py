"""Stage 4, the Ray Tune sweep over MixUp alpha, learning rate and weight decay, driving Ray Train trials."""
