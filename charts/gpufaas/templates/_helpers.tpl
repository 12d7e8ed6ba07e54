{{/* Names, labels and images shared by every template. */}}

{{- define "gpufaas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpufaas.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "gpufaas.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "gpufaas.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: <fullname>-<component>. */}}
{{- define "gpufaas.component" -}}
{{- printf "%s-%s" (include "gpufaas.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpufaas.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "gpufaas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpufaas
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "gateway"). */}}
{{- define "gpufaas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpufaas.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gpufaas.componentLabels" -}}
{{ include "gpufaas.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "gpufaas.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "gpufaas.gpuImage" -}}
{{- printf "%s:%s" .Values.gpuImage.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.gpuImage.tag) -}}
{{- end -}}

{{- define "gpufaas.authSecretName" -}}
{{- default (include "gpufaas.component" (dict "root" . "component" "auth")) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "gpufaas.gatewayUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "gpufaas.component" (dict "root" . "component" "gateway")) .Release.Namespace .Values.gateway.service.port -}}
{{- end -}}

{{/* The /tmp every read-only-root container gets. */}}
{{- define "gpufaas.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end -}}
