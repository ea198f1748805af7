"""Where each stage reads and writes, relative to the project root. dvc.yaml declares the same paths;
tests/code/test_consistency.py keeps the two in step."""

PARAMS = "params.yaml"
PREPARED_DIR = "data/prepared"
VALIDATION_REPORT = "reports/validation.json"
DATA_DOCS = "reports/data_docs"  # Great Expectations Data Docs (HTML) of the last validation
MODEL_DIR = "models"
TRAIN_REPORT = "reports/train.json"
TRAIN_HISTORY = "plots/train_history.csv"
EVAL_METRICS = "metrics/eval.json"  # quality: a function of data, params and code
PERF_METRICS = "metrics/perf.json"  # speed: a function of the machine too
CONFUSION = "plots/confusion.csv"
GATE_REPORT = "reports/gate.json"
GATE_MARKDOWN = "reports/gate.md"
MODEL_CARD = "reports/model_card.md"  # what the candidate is and gets wrong; the version's description
MISTAKES = "reports/mistakes.png"  # its worst test mistakes with Grad-CAM heat maps, linked from the card
REGISTRATION = "reports/registration.json"
PROMOTION = "reports/promotion.json"
MONITOR_REPORT = "reports/monitor.json"  # `tollgate monitor`: drift of live traffic (not a stage output)
MONITOR_HTML = "reports/monitor.html"
SHADOW_REPORT = "reports/shadow.json"  # `tollgate shadow`
TRAIN_CHECKPOINT = ".tollgate/checkpoints/train.pt"  # while training runs; removed once models/ is written
SERVER_STATE = ".tollgate/server.json"
KSERVE_MANIFEST = "deploy/kserve-inferenceservice.yaml"  # written by the kserve target, applied by people
PROMOTE_LOCK = ".tollgate/promote.lock"  # serialises promotions, rollbacks and a server's start
PROMOTION_INTENT = ".tollgate/promotion-intent.json"  # a promotion in progress, for recovery after a kill
STAGE_LOCK = ".tollgate/stage.lock"  # held by every running stage process of this checkout
PIPELINE_LOCK = ".tollgate/pipeline.lock"  # held by a Prefect flow run for its whole run
