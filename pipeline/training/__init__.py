"""Training: the network and its on-disk form (`model`), the loop (`loop`) fed by `batches`, resumable
through `checkpoint`, on one process or several (`distributed`)."""
