"""Training: the loop, checkpoints, metrics and launching (the API function is :func:`paratrain.train`)."""
