"""Stage 6, reports: a sweep's results table and figures, and the dataset's figures."""
