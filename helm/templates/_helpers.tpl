{{- define "ebpf-proxy.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ebpf-proxy.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ebpf-proxy.labels" -}}
app.kubernetes.io/name: {{ include "ebpf-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ebpf-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ebpf-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ebpf-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ebpf-proxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* mapSizes as NAME=ENTRIES,... in a stable order. */}}
{{- define "ebpf-proxy.mapSizes" -}}
{{- $sizes := list -}}
{{- range $name := keys .Values.agent.mapSizes | sortAlpha -}}
{{- $sizes = append $sizes (printf "%s=%d" $name (index $.Values.agent.mapSizes $name | int64)) -}}
{{- end -}}
{{- join "," $sizes -}}
{{- end -}}
