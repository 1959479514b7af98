"""Stage 5, using a trained model: evaluation, prediction (one file, or a corpus on Ray Data) and the
export that transformers' pipeline loads."""
