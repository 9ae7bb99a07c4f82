"""reflection-operator: runs the conversation importer as memory-limited Jobs for ImportRun resources."""

GROUP = "reflection.dev"
VERSION = "v1alpha1"
PLURAL = "importruns"
KIND = "ImportRun"
API_VERSION = f"{GROUP}/{VERSION}"

#: Labels the operator puts on everything it makes, and the importer on the state ConfigMaps it adds.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "reflection-operator"
LABEL_IMPORTRUN = "reflection.dev/importrun"
LABEL_RUN_ID = "reflection.dev/run-id"
LABEL_ATTEMPT = "reflection.dev/attempt"
LABEL_SHARD = "reflection.dev/shard"
LABEL_STATE_BUCKET = "reflection.dev/state-bucket"
ANNOTATION_MEMORY = "reflection.dev/memory"
ANNOTATION_SHARD_COUNT = "reflection.dev/shard-count"
ANNOTATION_SCHEDULED_TIME = "reflection.dev/scheduled-time"

#: Exit code of the importer when its RSS stayed over its memory budget (its state is saved).
EXIT_MEMORY_BUDGET = 86
