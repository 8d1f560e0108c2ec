{{/* Chart name. */}}
{{- define "prolong.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "prolong.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "prolong.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component. Call with (dict "ctx" $ "component" "operator"). */}}
{{- define "prolong.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prolong.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Common labels. Call with (dict "ctx" $ "component" "operator"). */}}
{{- define "prolong.labels" -}}
helm.sh/chart: {{ include "prolong.chart" .ctx }}
{{ include "prolong.selectorLabels" . }}
app.kubernetes.io/part-of: prolong
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{- define "prolong.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "prolong.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* No image is published under a default name: the user builds and names both (make images
REGISTRY=..., then --set operator.image.repository / rayCluster.image.repository). */ -}}
{{- define "prolong.operatorImage" -}}
{{- $repo := required "operator.image.repository: name the operator image you built and pushed (make images REGISTRY=<registry>; then --set operator.image.repository=<registry>/prolong-operator)" .Values.operator.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "prolong.rayImage" -}}
{{- $repo := required "rayCluster.image.repository: name the train image you built and pushed (make images REGISTRY=<registry>; then --set rayCluster.image.repository=<registry>/prolong-train)" .Values.rayCluster.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.rayCluster.image.tag) -}}
{{- end -}}

{{/* Long-lived RayCluster name: at most 47 characters (KubeRay derives longer names from it). */}}
{{- define "prolong.rayClusterName" -}}
{{- default (printf "%s-ray" (include "prolong.fullname" .)) .Values.rayCluster.name | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{/* Pod securityContext of the Ray pods: Kubernetes restricted profile, the same as
prolong.k8s.rayjob.POD_SECURITY_CONTEXT gives every stage pods (uid 1000: the train image user;
fsGroup: the storage volume is group-writable by it, a fresh volume being root; OnRootMismatch
changes ownership once, not at every start over a large volume). */}}
{{- define "prolong.raySecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}
