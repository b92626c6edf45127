{{- define "ebpf-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release name alone when it already contains the chart's (no "proxy-ebpf-proxy"). */}}
{{- define "ebpf-proxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "ebpf-proxy.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
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

{{- define "ebpf-proxy.image" -}}
{{- if not .Values.image.repository -}}
{{- fail "image.repository is required: build the image from proxy-userspace/Dockerfile (cargo xtask image), push it, and name it here" -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* How the agent reaches the API server without a service proxy; fails when unset. */}}
{{- define "ebpf-proxy.apiServerEnv" -}}
{{- if .Values.k8sServiceHost -}}
- name: PROXY_K8S_API_SERVER
  value: {{ printf "%s:%d" .Values.k8sServiceHost (.Values.k8sServicePort | int64) | quote }}
{{- else if .Values.k8sServiceHostFromKubeletConfig -}}
- name: PROXY_K8S_API_SERVER_FROM
  value: /run/proxy/kubelet.conf
{{- else if not .Values.apiServerViaClusterIP -}}
{{- fail "set k8sServiceHost (the API server's address, as kubelet reaches it) or k8sServiceHostFromKubeletConfig (e.g. /etc/kubernetes/kubelet.conf): without kube-proxy, nothing serves the kubernetes Service's ClusterIP on a new or rebooted node until the agent has programmed it. apiServerViaClusterIP: true accepts that risk" -}}
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
