{{/* The chart's name, or nameOverride (a label value: 63 characters at most). */}}
{{- define "reflection-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object's name: fullnameOverride, else the release name (plus the chart's name unless the
release name holds it already). 63 characters at most, like a DNS label. */}}
{{- define "reflection-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "reflection-operator.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a cluster-scoped object (ClusterRole, ClusterRoleBinding). With scope "namespace" several
releases may exist in different namespaces, so the namespace is part of the name. */}}
{{- define "reflection-operator.clusterName" -}}
{{- if eq .Values.scope "namespace" -}}
{{- printf "%s-%s" .Release.Namespace (include "reflection-operator.fullname" .) -}}
{{- else -}}
{{- include "reflection-operator.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "reflection-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "reflection-operator.labels" -}}
helm.sh/chart: {{ include "reflection-operator.chart" . }}
app.kubernetes.io/name: {{ include "reflection-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: reflection-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator's Pod. */}}
{{- define "reflection-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reflection-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels that select the bundled Qdrant's Pod. */}}
{{- define "reflection-operator.qdrantSelectorLabels" -}}
app.kubernetes.io/name: {{ include "reflection-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: qdrant
{{- end -}}

{{/* The operator's ServiceAccount. */}}
{{- define "reflection-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "reflection-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's image. */}}
{{- define "reflection-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The importer's image (the operator puts it into the Jobs it makes). */}}
{{- define "reflection-operator.importerImage" -}}
{{- printf "%s:%s" .Values.importer.image.repository (default .Chart.AppVersion .Values.importer.image.tag) -}}
{{- end -}}

{{/* The bundled Qdrant's Service name and URL. */}}
{{- define "reflection-operator.qdrantName" -}}
{{- printf "%s-qdrant" (include "reflection-operator.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{- define "reflection-operator.qdrantUrl" -}}
{{- printf "http://%s.%s.svc:6333" (include "reflection-operator.qdrantName" .) .Release.Namespace -}}
{{- end -}}

{{/* Namespaces that get the importer's ServiceAccount and Role: the release namespace, and with scope
"cluster" those listed in importer.namespaces (without repeats). */}}
{{- define "reflection-operator.importerNamespaces" -}}
{{- $namespaces := list .Release.Namespace -}}
{{- if and (eq .Values.scope "namespace") .Values.importer.namespaces -}}
{{- fail "importer.namespaces is for scope \"cluster\": with scope \"namespace\" the operator watches the release namespace only" -}}
{{- end -}}
{{- range .Values.importer.namespaces -}}
{{- $namespaces = append $namespaces . -}}
{{- end -}}
{{- $namespaces | uniq | toJson -}}
{{- end -}}

{{/* A command list as one string that the operator splits like a shell (each word in single quotes). */}}
{{- define "reflection-operator.shellJoin" -}}
{{- range $i, $word := . -}}
{{- if $i }} {{ end -}}
{{- $word | squote -}}
{{- end -}}
{{- end -}}
