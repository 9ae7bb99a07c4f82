"""reflection-operator: runs the conversation importer as memory-limited Jobs for ImportRun resources."""

GROUP = "reflection.dev"
VERSION = "v1alpha1"
PLURAL = "importruns"
KIND = "ImportRun"
API_VERSION = f"{GROUP}/{VERSION}"

# The labels shared with the importer, its exit codes, environment and summary: importer/contract.py.
#: Annotations only the operator reads.
ANNOTATION_MEMORY = "reflection.dev/memory"
ANNOTATION_SHARD_COUNT = "reflection.dev/shard-count"
ANNOTATION_SCHEDULED_TIME = "reflection.dev/scheduled-time"
