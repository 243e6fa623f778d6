{{/*
Expand the name of the chart.
*/}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A default fully qualified app name, truncated at 63 characters (DNS name limit).
If the release name contains the chart name, the release name is used as is.
*/}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the chart label.
*/}}
{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of the `helm test` pod: not the selector labels, so that neither the Service, the
PodDisruptionBudget nor the NetworkPolicy of the gateway pods takes it for one of them.
*/}}
{{- define "sluice.testSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{- define "sluice.testLabels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.testSelectorLabels" . }}
app.kubernetes.io/part-of: {{ include "sluice.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The ServiceAccount's name.
*/}}
{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding the environment variables (empty when there is none).
*/}}
{{- define "sluice.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else if .Values.secrets.create }}
{{- include "sluice.fullname" . }}
{{- end }}
{{- end }}

{{/*
The container port /metrics is served on: the separate metrics port, or 8080.
*/}}
{{- define "sluice.metricsPortName" -}}
{{- if and .Values.metrics.enabled (not (kindIs "invalid" .Values.metrics.port)) }}metrics{{ else }}http{{ end }}
{{- end }}

{{/*
The gateway configuration: .Values.config with the chart's server settings merged in.
*/}}
{{- define "sluice.config" -}}
{{- $config := deepCopy (default (dict) .Values.config) }}
{{- if not (hasKey $config "upstreams") }}
{{- /* No upstreams configured: the demo config (see values.yaml). */}}
{{- $_ := set $config "upstreams" (dict "demo" (dict "kind" "demo")) }}
{{- if not (hasKey $config "routes") }}
{{- $_ := set $config "routes" (list (dict "model" "demo" "upstream" "demo")) }}
{{- end }}
{{- if not (hasKey $config "plugins") }}
{{- $_ := set $config "plugins" (list (dict "name" "token_count") (dict "name" "latency")) }}
{{- end }}
{{- end }}
{{- $userServer := deepCopy (default (dict) (get $config "server")) }}
{{- $metrics := dict "enabled" .Values.metrics.enabled "port" .Values.metrics.port "require_admin_key" .Values.metrics.requireAdminKey }}
{{- $chartServer := dict "host" "0.0.0.0" "port" 8080 "drain_seconds" .Values.drain.deadlineSeconds "metrics" $metrics }}
{{- if eq .Values.configReload.mode "inPlace" }}
{{- $_ := set $chartServer "reload" (dict "watch" true "interval_seconds" .Values.configReload.intervalSeconds) }}
{{- end }}
{{- $server := mustMergeOverwrite (dict "admin_key" "${SLUICE_ADMIN_KEY:-}") $userServer $chartServer }}
{{- $_ := set $config "server" $server }}
{{- toYaml $config }}
{{- end }}
