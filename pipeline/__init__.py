"""tollgate's library, one folder per domain, each layer importing only the layers below it (an import
graph test in tests/code/test_architecture.py holds the order; docs/architecture.md draws it):

    core        config (params.yaml typed), paths, files (atomic writes, locks), failpoints, codegraph
    stack       the team's services on one machine, the DVC remote
    data        sources, the one image decoder, prepared splits, the Great Expectations suite, live-data
                shards (local or S3) and the feedback users label
    training    the network and its files, the training loop, checkpoints, torchrun
    registry    MLflow: the only code that imports it (store, runs, the pyfunc model, versions)
    monitoring  drift and the accuracy estimate, monitoring and shadow reports
    evaluation  metrics, the champion re-scored, the gate and every gate check (the online one too)
    serving     the HTTP server: routes, protocols, batching, sampling, shadow, its client
    release     registration (infra validation), verification, promotion and rollback, the guard, targets
    stages      one thin adapter per DVC stage
    cli         `tollgate`, the one composition root (it alone may import `flows`)
"""
