{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "kiln.fullname" -}}
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

{{- define "kiln.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ include "kiln.chart" . }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kiln.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* ConfigMap key for a repository path: ConfigMap keys cannot hold "/". */}}
{{- define "kiln.configMapKey" -}}
{{- . | replace "/" "__" }}
{{- end }}

{{- define "kiln.modelsConfigMapName" -}}
{{- default (printf "%s-models" (include "kiln.fullname" .)) .Values.modelRepository.configMap.name }}
{{- end }}

{{- define "kiln.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "kiln.fullname" .)) .Values.compileCache.pvc.existingClaim }}
{{- end }}

{{/* Custom metric names: the prometheus-adapter rules and the HPA must agree. */}}
{{- define "kiln.metric.inflight" -}}kiln_inflight_requests_avg1m{{- end }}
{{- define "kiln.metric.queueTimeP95" -}}kiln_queue_time_p95_seconds{{- end }}
