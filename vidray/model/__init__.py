"""Stage 2, the model: VideoMAE for classification and for masked pretraining, what a checkpoint
holds, and the one definition of inference (clips -> logits) that training, evaluation, prediction
and the export share. Reads the dataset contract (vidray.data.dataset); nothing later.
"""
