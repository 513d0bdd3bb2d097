{{/*
Names, labels and images shared by the templates.
*/}}

{{/* The prefix of every object's name: the release name, with "cairn" added
unless the release name already says it. */}}
{{- define "cairn.fullname" -}}
{{- if contains "cairn" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-cairn" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "cairn.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: cairn
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cairn
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "operator"). */}}
{{- define "cairn.selectorLabels" -}}
app.kubernetes.io/name: cairn
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.images.agent). */}}
{{- define "cairn.image" -}}
{{- $registry := .image.registry | default .root.Values.global.imageRegistry -}}
{{- $tag := .image.tag | default .root.Values.global.imageTag | default .root.Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The namespace of the Volume objects the CSI driver creates. */}}
{{- define "cairn.volumeNamespace" -}}
{{- .Values.csi.volumeNamespace | default .Release.Namespace -}}
{{- end -}}

{{/* The Secret holding the agents' site-to-site TLS material. */}}
{{- define "cairn.agentTLSSecret" -}}
{{- if eq .Values.tls.source "secret" -}}
{{- .Values.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-agent-tls" (include "cairn.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Service account names. */}}
{{- define "cairn.operatorServiceAccount" -}}{{ include "cairn.fullname" . }}-operator{{- end -}}
{{- define "cairn.agentServiceAccount" -}}{{ include "cairn.fullname" . }}-agent{{- end -}}
{{- define "cairn.csiControllerServiceAccount" -}}{{ include "cairn.fullname" . }}-csi-controller{{- end -}}
{{- define "cairn.csiNodeServiceAccount" -}}{{ include "cairn.fullname" . }}-csi-node{{- end -}}

{{/* The security context of containers that need no privilege at all. */}}
{{- define "cairn.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The socket the CSI driver and its sidecars share in a pod. */}}
{{- define "cairn.csiSocketDir" -}}/csi{{- end -}}
{{- define "cairn.csiSocket" -}}/csi/csi.sock{{- end -}}
